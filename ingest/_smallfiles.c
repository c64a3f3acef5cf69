/* ingest._smallfiles: the per-file system calls of the walk and of the reader, in C.
 *
 * Two loops that ingest/walk.py and ingest/reader.py run in Python without this
 * extension, and that each hand back to that Python loop anything out of the ordinary,
 * so that the errors, warnings and their messages stay in one place.
 *
 * stat_run(dir_fd, names, start, columns, count) -> (stop, count)
 *
 * lstats names[start:], relative to the directory `dir_fd`, while each is an ASCII
 * name of a regular file, and writes its fingerprint (size, mtime_ns, ctime_ns, inode,
 * device) at row `count` of `columns`, five writable buffers of 8-byte integers
 * (signed, signed, signed, unsigned, unsigned), one row more each time. It stops at
 * the first entry it does not take (any other name, kind, or failing lstat; a time
 * that does not fit 64 bits), or when the columns are full, and says where.
 *
 * read_run(pieces, buffer, filled, limit, directory, flags, digests, digest)
 *     -> (filled, pending)
 *
 * Takes pieces from the iterator `pieces` and, for each one that fits whole in
 * buffer[filled:limit], does what BlockReader does for it: opens the file by name
 * relative to its directory (`directory`, the reader's _Directory, whose `path` and
 * `fd` it reads and updates), reads the piece with pread, checks with fstat that the
 * file still matches the piece's fingerprint, closes it, and appends
 * digest(piece bytes) to `digests` (unless it is None). It stops at the first piece
 * it does not finish and returns it as `pending`, untouched by anything but a read
 * into the free part of the buffer: a piece that does not fit, or anything out of
 * the ordinary (a piece that is not a 4-tuple with a 5-tuple fingerprint of ints, a
 * path it cannot pass to the kernel as it is, any failing system call, a short read,
 * a changed file). The caller's own loop then handles that piece, and raises the
 * error there is to raise, so the errors and their messages stay in one place.
 * `pending` is None when the iterator is exhausted.
 *
 * Both let go of the GIL around each file's system calls, as the os module does: on a
 * cold page cache a file's read or lstat can wait on the disk, and the process's other
 * threads (a worker's committer, the coordinator's progress display) must run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef O_PATH
#define O_PATH O_RDONLY
#endif

#define DIRECTORY_FLAGS (O_PATH | O_DIRECTORY | O_CLOEXEC)

typedef struct {
    const char *path;        /* UTF-8 (what os.open would pass: the path has no surrogates) */
    Py_ssize_t path_len;
    long long size, mtime_ns, ctime_ns, offset, length;
    unsigned long long inode, device;
} piece;

/* The directory held open, as the Python object had it on entry. */
typedef struct {
    char path[PATH_MAX];
    Py_ssize_t len;          /* -1: none */
    int fd;
    int changed;             /* path or fd differ from the Python object's */
} held_dir;

static int as_long_long(PyObject *o, long long *out)
{
    if (!PyLong_Check(o))
        return 0;
    *out = PyLong_AsLongLong(o);
    return !(*out == -1 && PyErr_Occurred());
}

static int as_unsigned(PyObject *o, unsigned long long *out)
{
    if (!PyLong_Check(o))
        return 0;
    *out = PyLong_AsUnsignedLongLong(o);
    return !(*out == (unsigned long long)-1 && PyErr_Occurred());
}

/* 1 if `item` is (path, (size, mtime, ctime, inode, device), offset, length) with
 * values the fast path takes; 0 otherwise (any error cleared). */
static int parse_piece(PyObject *item, piece *p)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4)
        return 0;
    PyObject *path = PyTuple_GET_ITEM(item, 0), *fp = PyTuple_GET_ITEM(item, 1);
    if (!PyUnicode_Check(path) || !PyTuple_Check(fp) || PyTuple_GET_SIZE(fp) != 5)
        return 0;
    int ok = (p->path = PyUnicode_AsUTF8AndSize(path, &p->path_len)) != NULL
        && as_long_long(PyTuple_GET_ITEM(fp, 0), &p->size)
        && as_long_long(PyTuple_GET_ITEM(fp, 1), &p->mtime_ns)
        && as_long_long(PyTuple_GET_ITEM(fp, 2), &p->ctime_ns)
        && as_unsigned(PyTuple_GET_ITEM(fp, 3), &p->inode)
        && as_unsigned(PyTuple_GET_ITEM(fp, 4), &p->device)
        && as_long_long(PyTuple_GET_ITEM(item, 2), &p->offset)
        && as_long_long(PyTuple_GET_ITEM(item, 3), &p->length);
    if (!ok) {
        PyErr_Clear();
        return 0;
    }
    return p->offset >= 0 && p->length >= 0 && p->path_len > 0
        && memchr(p->path, '\0', (size_t)p->path_len) == NULL;
}

/* The descriptor to open `p`'s file at and the name to open there, with the file's
 * directory held open in `d`; -2 when the fast path should not go on. */
static int opener(held_dir *d, const piece *p, const char **name)
{
    const char *slash = memrchr(p->path, '/', (size_t)p->path_len);
    if (slash == NULL) {
        *name = p->path;
        return AT_FDCWD;
    }
    Py_ssize_t len = slash - p->path;
    *name = slash + 1;
    if (d->len == len && memcmp(d->path, p->path, (size_t)len) == 0)
        return d->fd;
    if (len >= PATH_MAX)
        return -2;
    if (d->fd >= 0)
        close(d->fd);
    d->changed = 1;
    memcpy(d->path, p->path, (size_t)len);
    d->path[len] = '\0';
    d->fd = open(len ? d->path : "/", DIRECTORY_FLAGS);
    d->len = d->fd >= 0 ? len : -1;
    return d->fd >= 0 ? d->fd : -2;
}

/* A stat time in nanoseconds, as os.stat gives it; 0 if it does not fit 64 bits. */
static int time_ns(const struct timespec *t, long long *out)
{
    long long ns;
    return !__builtin_mul_overflow((long long)t->tv_sec, 1000000000LL, &ns)
        && !__builtin_add_overflow(ns, (long long)t->tv_nsec, out);
}

/* Read `p` into `dst` and check its file against its fingerprint: 1 if all went
 * as it should. */
static int read_piece(held_dir *d, const piece *p, int flags, char *dst)
{
    const char *name;
    int at = opener(d, p, &name);
    if (at == -2)
        return 0;
    int fd = openat(at, name, flags);
    if (fd < 0)
        return 0;
    long long offset = p->offset, left = p->length;
    while (left > 0) {
        ssize_t got = pread(fd, dst, (size_t)left, (off_t)offset);
        if (got <= 0) {
            close(fd);
            return 0;
        }
        dst += got, offset += got, left -= got;
    }
    struct stat st;
    long long mtime_ns, ctime_ns;
    int same = fstat(fd, &st) == 0
        && time_ns(&st.st_mtim, &mtime_ns) && time_ns(&st.st_ctim, &ctime_ns)
        && (long long)st.st_size == p->size && mtime_ns == p->mtime_ns && ctime_ns == p->ctime_ns
        && (unsigned long long)st.st_ino == p->inode
        && (unsigned long long)st.st_dev == p->device;
    close(fd);
    return same;
}

static int load_dir(PyObject *directory, held_dir *d)
{
    PyObject *path = PyObject_GetAttrString(directory, "path");
    PyObject *fd = path ? PyObject_GetAttrString(directory, "fd") : NULL;
    int ok = fd != NULL && PyLong_Check(fd);
    if (ok) {
        d->fd = (int)PyLong_AsLong(fd);
        d->len = -1;
        d->changed = 0;
        Py_ssize_t len;
        const char *utf8 = path != Py_None && PyUnicode_Check(path) ? PyUnicode_AsUTF8AndSize(path, &len) : NULL;
        if (utf8 != NULL && len < PATH_MAX) {
            memcpy(d->path, utf8, (size_t)len);
            d->len = len;
        }
        PyErr_Clear();           /* a path not held as it is: the next file's directory is opened anew */
        ok = !PyErr_Occurred() && d->fd >= -1;
    }
    if (!ok && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "directory: path (str or None) and fd (int) expected");
    Py_XDECREF(path);
    Py_XDECREF(fd);
    return ok;
}

/* Tell the Python object what directory is held now, keeping any pending exception. */
static int store_dir(PyObject *directory, const held_dir *d)
{
    if (!d->changed)
        return 1;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *path = d->len >= 0 ? PyUnicode_DecodeUTF8(d->path, d->len, "strict") : Py_NewRef(Py_None);
    PyObject *fd = PyLong_FromLong(d->len >= 0 ? d->fd : -1);
    int ok = path && fd && PyObject_SetAttrString(directory, "path", path) == 0
        && PyObject_SetAttrString(directory, "fd", fd) == 0;
    Py_XDECREF(path);
    Py_XDECREF(fd);
    if (type != NULL)
        PyErr_Restore(type, value, traceback);
    return ok;
}

static PyObject *read_run(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *pieces, *buffer, *directory, *digests, *digest;
    Py_ssize_t filled, limit;
    int flags;
    if (!PyArg_ParseTuple(args, "OOnnOiOO:read_run", &pieces, &buffer, &filled, &limit, &directory,
                          &flags, &digests, &digest))
        return NULL;
    if (digests != Py_None && !PyList_Check(digests))
        return PyErr_Format(PyExc_TypeError, "digests: a list or None expected");
    Py_buffer view;
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    held_dir d;
    if (filled < 0 || filled > limit || limit > view.len) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "filled %zd, limit %zd: outside a buffer of %zd bytes",
                            filled, limit, view.len);
    }
    if (!load_dir(directory, &d)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *pending = NULL, *item;
    int failed = 0;
    while ((item = PyIter_Next(pieces)) != NULL) {
        piece p;
        char *dst = (char *)view.buf + filled;
        int read = 0;
        if (parse_piece(item, &p) && p.length <= limit - filled) {
            Py_BEGIN_ALLOW_THREADS
            read = read_piece(&d, &p, flags, dst);
            Py_END_ALLOW_THREADS
        }
        if (!read) {
            pending = item;
            break;
        }
        if (digests != Py_None) {
            PyObject *bytes = PyMemoryView_FromMemory(dst, (Py_ssize_t)p.length, PyBUF_READ);
            PyObject *value = bytes ? PyObject_CallOneArg(digest, bytes) : NULL;
            Py_XDECREF(bytes);
            failed = value == NULL || PyList_Append(digests, value) < 0;
            Py_XDECREF(value);
        }
        Py_DECREF(item);
        if (failed)
            break;
        filled += (Py_ssize_t)p.length;
    }
    PyBuffer_Release(&view);
    if (!store_dir(directory, &d) || failed || PyErr_Occurred()) {
        Py_XDECREF(pending);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(nO)", filled, pending ? pending : Py_None);
    Py_XDECREF(pending);
    return result;
}

#define COLUMNS 5

static PyObject *stat_run(PyObject *module, PyObject *args)
{
    (void)module;
    int dir_fd;
    PyObject *names, *columns;
    Py_ssize_t start, count;
    if (!PyArg_ParseTuple(args, "iO!nO!n:stat_run", &dir_fd, &PyList_Type, &names, &start,
                          &PyTuple_Type, &columns, &count))
        return NULL;
    if (PyTuple_GET_SIZE(columns) != COLUMNS)
        return PyErr_Format(PyExc_ValueError, "columns: %d buffers expected", COLUMNS);
    Py_buffer views[COLUMNS];
    int held = 0;
    Py_ssize_t rows = -1;
    for (; held < COLUMNS; held++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(columns, held), &views[held], PyBUF_WRITABLE) < 0)
            break;
        if (views[held].len % 8 || (rows >= 0 && views[held].len / 8 != rows)) {
            PyErr_SetString(PyExc_ValueError, "columns: buffers of as many 8-byte rows expected");
            held++;
            break;
        }
        rows = views[held].len / 8;
    }
    Py_ssize_t i = start, n = PyList_GET_SIZE(names);
    if (held == COLUMNS && (start < 0 || start > n || count < 0 || count > rows))
        PyErr_Format(PyExc_ValueError, "start %zd, count %zd: outside %zd names, %zd rows", start, count, n, rows);
    if (held == COLUMNS && !PyErr_Occurred()) {
        long long *size = views[0].buf, *mtime = views[1].buf, *ctime = views[2].buf;
        unsigned long long *inode = views[3].buf, *device = views[4].buf;
        for (; i < PyList_GET_SIZE(names) && count < rows; i++, count++) {   /* re-read: the GIL is let go */
            PyObject *name = PyList_GET_ITEM(names, i);
            if (!PyUnicode_CheckExact(name) || !PyUnicode_IS_ASCII(name))
                break;
            const char *s = (const char *)PyUnicode_DATA(name);
            size_t len = (size_t)PyUnicode_GET_LENGTH(name);
            if (len == 0 || strlen(s) != len || memchr(s, '/', len))
                break;
            struct stat st;
            int got;
            Py_INCREF(name);     /* its characters stay put while the GIL is let go */
            Py_BEGIN_ALLOW_THREADS
            got = fstatat(dir_fd, s, &st, AT_SYMLINK_NOFOLLOW) == 0;
            Py_END_ALLOW_THREADS
            Py_DECREF(name);
            if (!got || !S_ISREG(st.st_mode) || !time_ns(&st.st_mtim, &mtime[count])
                || !time_ns(&st.st_ctim, &ctime[count]))
                break;
            size[count] = (long long)st.st_size;
            inode[count] = (unsigned long long)st.st_ino;
            device[count] = (unsigned long long)st.st_dev;
        }
    }
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&views[k]);
    if (PyErr_Occurred())
        return NULL;
    return Py_BuildValue("(nn)", i, count);
}

static PyMethodDef methods[] = {
    {"stat_run", stat_run, METH_VARARGS,
     "stat_run(dir_fd, names, start, columns, count) -> (stop, count)\n\n"
     "lstat the regular files of names[start:] into the columns' rows; see ingest/_smallfiles.c."},
    {"read_run", read_run, METH_VARARGS,
     "read_run(pieces, buffer, filled, limit, directory, flags, digests, digest) -> (filled, pending)\n\n"
     "Read the small pieces that fit in buffer[filled:limit]; see ingest/_smallfiles.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ingest._smallfiles",
    .m_doc = "The per-file system calls of the walk and of the reader, in C (see ingest.walk, ingest.reader).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__smallfiles(void)
{
    return PyModule_Create(&module);
}
