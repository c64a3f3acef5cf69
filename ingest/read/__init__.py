"""The read side: list, print, download and verify what a manifest describes.

| module | job |
| --- | --- |
| ``source`` | load a manifest from a file, stdin or Keep; save one into Keep |
| ``names`` | collection paths given by users; names safe to create on disk; display |
| ``select`` | the files and directories of a manifest under one path |
| ``blocks`` | file ranges grouped by the block that holds them |
| ``pool`` | a bounded pool of processes, each handling whole blocks |
| ``cat`` | one file's bytes to a stream, block by block |
| ``getstate`` | the resume journal of ``get`` (and its lock) |
| ``get`` | download a tree: temp files, atomic renames, resume |
| ``verify`` | compare a tree with a manifest, without holding whole files |
"""
