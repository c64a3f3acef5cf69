"""The Arvados API client: settings, discovery, Keep services, users, groups, collections.

Kept apart from the Keep client (:mod:`ingest.keep`): the coordinator talks to the
API before a run starts and when it saves the collection; workers never do.
"""
