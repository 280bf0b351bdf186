/* The byte-moving steps of a warm load, in C with the GIL released once per call (docs/adr/0029).
 * Optional: mlfs does the same steps in Python without it (mlfs/cache.py, mlfs/fs.py).
 *
 *   read_sealed(path, buffer, want, size, seed, block) -> (got, ok, sums)
 *       Reads up to *want* bytes of the chunk file *path* with O_DIRECT into *buffer* (writable,
 *       page-aligned, at least *want* rounded up to a page), in pieces of READ_PIECE.  If the file
 *       held size + 16 bytes, checks the seal (XXH3-128 of the first *size* bytes seeded with
 *       *seed*, canonical form, stored after them: mlfs.cache.seal): *ok* is True if it matches.
 *       If it matches and *block* > 0, *sums* holds XXH3-64 of each *block*-sized piece seeded with
 *       seed ^ index (mlfs.cache.ChunkCache._block_sums), else None.  Raises OSError (EINVAL: the
 *       file system refused O_DIRECT).
 *
 *   store(fd, inode, offset, data)
 *       Sends FUSE_NOTIFY_STORE for *inode* at *offset* with *data* on the /dev/fuse descriptor
 *       *fd*: what pyfuse3.notify_store does through libfuse, as one writev.  Raises OSError.
 *
 *   stream(fd, inode, jobs, buffers, piece) -> (results, push_seconds)
 *       read_sealed and store for many chunks of one file, by one thread per buffer (each
 *       buffer page-aligned and large enough for every job's read), reading in requests of
 *       *piece* bytes, without the GIL until all are done.  A job is (path, size, seed, block, offset, push_from, push_to, head, tail_from):
 *       the chunk file, its size and seal seed, the block size for its checksums (0: none), where
 *       the chunk starts in the file, the part of it to push (whole pages: [push_from, push_to) of
 *       the chunk, at offset + push_from), and the parts to hand back for the pages it shares
 *       with its neighbours: bytes [0, head) and [tail_from, size).  A result is (status, errno,
 *       sums, head bytes, tail bytes): status OK, MISSING (open or read failed: errno), DAMAGED
 *       (wrong length or seal), UNPUSHED (the store failed: errno; later jobs are SKIPPED).
 *
 * XXH3 runs in its AVX2 build where the CPU has AVX2 (mlfs/_dataplane_avx2.c), else in SSE2.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "_dataplane.h"

#define READ_PIECE (1 << 20)
#define SEAL 16
#define FUSE_NOTIFY_STORE 4

struct out_header {  /* struct fuse_out_header (linux/fuse.h) */
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

struct notify_store_out {  /* struct fuse_notify_store_out */
    uint64_t nodeid;
    uint64_t offset;
    uint32_t size;
    uint32_t padding;
};

static int have_avx2;

static void xxh3_128(const void *p, size_t n, unsigned long long seed, unsigned char out[16])
{
    XXH128_hash_t h;
    if (have_avx2) {
        unsigned long long v[2];
        dp_xxh3_128_avx2(p, n, seed, v);
        h.low64 = v[0];
        h.high64 = v[1];
    } else {
        h = XXH3_128bits_withSeed(p, n, seed);
    }
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, 16);
}

static void xxh3_64(const void *p, size_t n, unsigned long long seed, unsigned char out[8])
{
    XXH64_hash_t h = have_avx2 ? dp_xxh3_64_avx2(p, n, seed) : XXH3_64bits_withSeed(p, n, seed);
    XXH64_canonical_t c;
    XXH64_canonicalFromHash(&c, h);
    memcpy(out, c.digest, 8);
}

/* Reads up to *want* bytes of *path* with O_DIRECT into *p* (*cap* bytes, page-aligned): the byte
 * count, or -errno. */
static Py_ssize_t direct_read(const char *path, unsigned char *p, Py_ssize_t cap, Py_ssize_t want,
                              Py_ssize_t piece)
{
    Py_ssize_t got = 0;
    int fd = open(path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    Py_ssize_t rounded = (want + 4095) / 4096 * 4096;
    if (rounded > cap)
        rounded = cap / 4096 * 4096;
    while (got < want) {
        Py_ssize_t n = rounded - got < piece ? rounded - got : piece;
        if (n <= 0)
            break;
        ssize_t k = pread(fd, p + got, (size_t)n, (off_t)got);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            close(fd);
            return -e;
        }
        if (k == 0)
            break;
        got += k;
    }
    close(fd);
    return got > want ? want : got;
}

/* Checks the seal after *size* bytes at *p* and, if it matches and *block* > 0, writes the block
 * checksums to *sums* ((size + block - 1) / block * 8 bytes).  1 if the seal matched. */
static int check_seal(const unsigned char *p, Py_ssize_t size, unsigned long long seed,
                      Py_ssize_t block, unsigned char *sums)
{
    unsigned char digest[16];
    xxh3_128(p, (size_t)size, seed, digest);
    if (memcmp(digest, p + size, SEAL) != 0)
        return 0;
    if (block > 0 && sums != NULL)
        for (Py_ssize_t i = 0, a = 0; a < size; i++, a += block)
            xxh3_64(p + a, (size_t)(size - a < block ? size - a : block),
                    seed ^ (unsigned long long)i, sums + 8 * i);
    return 1;
}

static int notify_store(int fd, unsigned long long inode, unsigned long long offset,
                        const void *data, size_t len)
{
    struct notify_store_out arg = {inode, offset, (uint32_t)len, 0};
    struct out_header head = {(uint32_t)(sizeof head + sizeof arg + len), FUSE_NOTIFY_STORE, 0};
    struct iovec iov[3] = {{&head, sizeof head}, {&arg, sizeof arg}, {(void *)data, len}};
    ssize_t k;
    do {
        k = writev(fd, iov, 3);
    } while (k < 0 && errno == EINTR);
    if (k < 0)
        return errno;
    return (size_t)k == head.len ? 0 : EIO;
}

static PyObject *read_sealed(PyObject *self, PyObject *args)
{
    PyObject *path_obj, *sums = Py_None;
    Py_buffer buf;
    Py_ssize_t want, size, block, got = 0;
    unsigned long long seed;
    int ok = 0, err = 0;
    unsigned char *blocks = NULL;
    Py_ssize_t nblocks = 0;

    if (!PyArg_ParseTuple(args, "O&w*nnKn", PyUnicode_FSConverter, &path_obj, &buf, &want, &size,
                          &seed, &block))
        return NULL;
    if (want < 0 || size < 0 || size > want || buf.len < want) {
        PyBuffer_Release(&buf);
        Py_DECREF(path_obj);
        PyErr_SetString(PyExc_ValueError, "read_sealed: buffer smaller than the read");
        return NULL;
    }
    if (block > 0 && size >= block) {
        nblocks = (size + block - 1) / block;
        blocks = PyMem_RawMalloc((size_t)nblocks * 8);
        if (blocks == NULL) {
            PyBuffer_Release(&buf);
            Py_DECREF(path_obj);
            return PyErr_NoMemory();
        }
    }
    const char *path = PyBytes_AS_STRING(path_obj);
    unsigned char *p = buf.buf;
    Py_BEGIN_ALLOW_THREADS
    got = direct_read(path, p, buf.len, want, READ_PIECE);
    if (got < 0)
        err = (int)-got;
    else if (got == size + SEAL)
        ok = check_seal(p, size, seed, blocks != NULL ? block : 0, blocks);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    if (err) {
        PyMem_RawFree(blocks);
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
        Py_DECREF(path_obj);
        return NULL;
    }
    Py_DECREF(path_obj);
    if (ok && blocks != NULL) {
        sums = PyBytes_FromStringAndSize((const char *)blocks, nblocks * 8);
        PyMem_RawFree(blocks);
        if (sums == NULL)
            return NULL;
        return Py_BuildValue("nON", got, Py_True, sums);
    }
    PyMem_RawFree(blocks);
    return Py_BuildValue("nOO", got, ok ? Py_True : Py_False, Py_None);
}

static PyObject *store(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long inode, offset;
    Py_buffer data;
    int err = 0;

    if (!PyArg_ParseTuple(args, "iKKy*", &fd, &inode, &offset, &data))
        return NULL;
    if ((size_t)data.len > UINT32_MAX - sizeof(struct out_header) - sizeof(struct notify_store_out)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "store: too many bytes for one notification");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    err = notify_store(fd, inode, offset, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}


/* -- stream ------------------------------------------------------------------------------------ */

enum { OK = 0, MISSING = 1, DAMAGED = 2, UNPUSHED = 3, SKIPPED = 4, TAKEN = 5 };
/* Each job has three bytes in a buffer the caller shares (claim(), pin() and unpin() use them
 * from Python while the threads run): its state, the buffer holding its bytes from VERIFIED to
 * DONE, and how many readers are copying out of that buffer. */
enum { QUEUED = 0, CLAIMED = 1, READING = 2, VERIFIED = 3, RELEASING = 4, DONE = 5, FAILED = 6 };
#define STATE(shared, i) ((shared) + 3 * (i))
#define WHERE(shared, i) ((shared) + 3 * (i) + 1)
#define PINS(shared, i) ((shared) + 3 * (i) + 2)

struct job {
    PyObject *path;  /* bytes, held until the results are built */
    Py_ssize_t size, block, push_from, push_to, head, tail_from;
    unsigned long long seed, offset;
    /* results */
    int status, err;
    unsigned char *sums;  /* in the shared sums buffer: (size + block - 1) / block * 8 bytes */
    unsigned char *edges; /* head bytes, then tail bytes */
};

struct run {
    int fd;
    unsigned long long inode;
    Py_ssize_t piece;
    struct job *jobs;
    Py_ssize_t njobs;
    unsigned char *shared;  /* 3 * njobs bytes */
    atomic_long next;
    atomic_int stop;
    pthread_mutex_t lock;
    double push_seconds;
};

struct worker {
    struct run *run;
    unsigned char *buf;
    Py_ssize_t cap;
    int index;  /* of its buffer in the caller's list */
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *work(void *arg)
{
    struct worker *w = arg;
    struct run *r = w->run;
    for (;;) {
        long i = atomic_fetch_add(&r->next, 1);
        if (i >= r->njobs)
            break;
        struct job *j = &r->jobs[i];
        unsigned char *state = STATE(r->shared, i), queued = QUEUED;
        if (!__atomic_compare_exchange_n(state, &queued, READING, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE)) {
            j->status = TAKEN;  /* a read asked for it first: the caller loads it */
            continue;
        }
        if (atomic_load(&r->stop)) {
            j->status = SKIPPED;
            __atomic_store_n(state, FAILED, __ATOMIC_RELEASE);
            continue;
        }
        Py_ssize_t got = direct_read(PyBytes_AS_STRING(j->path), w->buf, w->cap, j->size + SEAL + 1,
                                     r->piece);
        if (got < 0) {
            j->status = MISSING;
            j->err = (int)-got;
            __atomic_store_n(state, FAILED, __ATOMIC_RELEASE);
            continue;
        }
        if (got != j->size + SEAL || !check_seal(w->buf, j->size, j->seed, j->block, j->sums)) {
            j->status = DAMAGED;
            __atomic_store_n(state, FAILED, __ATOMIC_RELEASE);
            continue;
        }
        /* From here until DONE a read of this chunk may copy its bytes out of this buffer
         * (pin()): the push below may itself be waiting for that read's pages, which the
         * kernel holds locked until the read is answered. */
        __atomic_store_n(WHERE(r->shared, i), (unsigned char)w->index, __ATOMIC_RELAXED);
        __atomic_store_n(state, VERIFIED, __ATOMIC_SEQ_CST);
        if (j->head > 0)
            memcpy(j->edges, w->buf, (size_t)j->head);
        if (j->tail_from < j->size)
            memcpy(j->edges + j->head, w->buf + j->tail_from, (size_t)(j->size - j->tail_from));
        if (j->push_to > j->push_from) {
            double t = now();
            int e = notify_store(r->fd, r->inode, j->offset + (unsigned long long)j->push_from,
                                 w->buf + j->push_from, (size_t)(j->push_to - j->push_from));
            t = now() - t;
            pthread_mutex_lock(&r->lock);
            r->push_seconds += t;
            pthread_mutex_unlock(&r->lock);
            if (e) {
                j->status = UNPUSHED;
                j->err = e;
                atomic_store(&r->stop, 1);  /* the inode is forgotten or the mount is going away */
                __atomic_store_n(state, RELEASING, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(PINS(r->shared, i), __ATOMIC_SEQ_CST) != 0)
                    sched_yield();
                __atomic_store_n(state, FAILED, __ATOMIC_RELEASE);
                continue;
            }
        }
        j->status = OK;
        /* Dekker with pin(): a reader raises the pin count and then looks for VERIFIED; this
         * thread leaves VERIFIED and then looks at the pin count.  One of them sees the other. */
        __atomic_store_n(state, RELEASING, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(PINS(r->shared, i), __ATOMIC_SEQ_CST) != 0)
            sched_yield();
        __atomic_store_n(state, DONE, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void free_jobs(struct job *jobs, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(jobs[i].path);
        PyMem_RawFree(jobs[i].edges);
    }
    PyMem_RawFree(jobs);
}

static PyObject *stream(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long inode;
    PyObject *job_list, *buf_list, *results = NULL, *out = NULL;
    Py_ssize_t piece;
    Py_buffer progress, sums;
    if (!PyArg_ParseTuple(args, "iKO!O!nw*w*", &fd, &inode, &PyList_Type, &job_list, &PyList_Type,
                          &buf_list, &piece, &progress, &sums))
        return NULL;
    if (progress.len < 3 * PyList_GET_SIZE(job_list)) {
        PyBuffer_Release(&progress);
        PyBuffer_Release(&sums);
        PyErr_SetString(PyExc_ValueError, "stream: three shared bytes per job");
        return NULL;
    }
    if (piece < 4096 || piece % 4096) {
        PyBuffer_Release(&progress);
        PyBuffer_Release(&sums);
        PyErr_SetString(PyExc_ValueError, "stream: the read piece is a multiple of the page size");
        return NULL;
    }
    Py_ssize_t njobs = PyList_GET_SIZE(job_list), nbufs = PyList_GET_SIZE(buf_list);
    if (nbufs < 1 || nbufs > 16) {
        PyBuffer_Release(&progress);
        PyBuffer_Release(&sums);
        PyErr_SetString(PyExc_ValueError, "stream: 1 to 16 buffers");
        return NULL;
    }
    struct job *jobs = PyMem_RawCalloc((size_t)(njobs ? njobs : 1), sizeof *jobs);
    Py_buffer *bufs = PyMem_RawCalloc((size_t)nbufs, sizeof *bufs);
    Py_ssize_t held = 0, min_cap = PY_SSIZE_T_MAX, i;
    if (jobs == NULL || bufs == NULL) {
        PyMem_RawFree(jobs);
        PyMem_RawFree(bufs);
        PyBuffer_Release(&progress);
        PyBuffer_Release(&sums);
        return PyErr_NoMemory();
    }
    for (; held < nbufs; held++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(buf_list, held), &bufs[held], PyBUF_WRITABLE) < 0)
            goto fail;
        if (((uintptr_t)bufs[held].buf & 4095) != 0) {
            PyBuffer_Release(&bufs[held]);
            PyErr_SetString(PyExc_ValueError, "stream: buffers must start on a page");
            goto fail;
        }
        if (bufs[held].len < min_cap)
            min_cap = bufs[held].len;
    }
    for (i = 0; i < njobs; i++) {
        struct job *j = &jobs[i];
        Py_ssize_t sums_at;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(job_list, i), "O&nKnKnnnnn", PyUnicode_FSConverter,
                              &j->path, &j->size, &j->seed, &j->block, &j->offset, &j->push_from,
                              &j->push_to, &j->head, &j->tail_from, &sums_at))
            goto fail;
        Py_ssize_t nsums = j->block > 0 ? (j->size + j->block - 1) / j->block * 8 : 0;
        if (j->size < 0 || (j->size + SEAL + 1 + 4095) / 4096 * 4096 > min_cap || j->push_from < 0
            || j->push_to > j->size || j->head < 0 || j->head > j->size || j->tail_from < 0
            || j->tail_from > j->size || j->block < 0
            || (nsums > 0 && (sums_at < 0 || sums_at > sums.len - nsums))) {
            PyErr_SetString(PyExc_ValueError, "stream: a job does not fit its chunk or the buffers");
            goto fail;
        }
        j->sums = nsums > 0 ? (unsigned char *)sums.buf + sums_at : NULL;
        if ((j->edges = PyMem_RawMalloc((size_t)(j->head + j->size - j->tail_from + 1))) == NULL)
            goto nomem;
    }

    struct run r = {.fd = fd, .inode = inode, .piece = piece, .jobs = jobs, .njobs = njobs,
                    .shared = progress.buf};
    atomic_init(&r.next, 0);
    atomic_init(&r.stop, 0);
    pthread_mutex_init(&r.lock, NULL);
    struct worker workers[16];
    pthread_t threads[16];
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < nbufs; i++) {
        workers[i] = (struct worker){&r, bufs[i].buf, bufs[i].len, (int)i};
        if (i > 0 && pthread_create(&threads[i], NULL, work, &workers[i]) != 0)
            break;
        started = (int)i + 1;
    }
    work(&workers[0]);  /* this thread is one of them */
    for (i = 1; i < started; i++)
        pthread_join(threads[i], NULL);
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&r.lock);

    results = PyList_New(njobs);
    for (i = 0; results != NULL && i < njobs; i++) {
        struct job *j = &jobs[i];
        PyObject *item;
        if (j->status == OK)
            item = Py_BuildValue("iiy#y#", j->status, j->err, j->edges, j->head,
                                 j->edges + j->head, j->size - j->tail_from);
        else
            item = Py_BuildValue("iiyy", j->status, j->err, "", "");
        if (item == NULL)
            Py_CLEAR(results);
        else
            PyList_SET_ITEM(results, i, item);
    }
    if (results != NULL)
        out = Py_BuildValue("Nd", results, r.push_seconds);
    goto done;

nomem:
    PyErr_NoMemory();
fail:
done:
    for (i = 0; i < held; i++)
        PyBuffer_Release(&bufs[i]);
    PyMem_RawFree(bufs);
    free_jobs(jobs, njobs);
    PyBuffer_Release(&progress);
    PyBuffer_Release(&sums);
    return out;
}

/* The shared bytes of job *i*, or NULL (an exception set). */
static unsigned char *job_bytes(PyObject *args, Py_buffer *shared, Py_ssize_t *i)
{
    if (!PyArg_ParseTuple(args, "w*n", shared, i))
        return NULL;
    if (*i < 0 || 3 * *i + 3 > shared->len) {
        PyBuffer_Release(shared);
        PyErr_SetString(PyExc_IndexError, "no such job");
        return NULL;
    }
    return (unsigned char *)shared->buf;
}

static PyObject *claim(PyObject *self, PyObject *args)
{
    Py_buffer shared;
    Py_ssize_t i;
    unsigned char *b = job_bytes(args, &shared, &i), seen = QUEUED;
    if (b == NULL)
        return NULL;
    if (__atomic_compare_exchange_n(STATE(b, i), &seen, CLAIMED, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
        seen = QUEUED;
    PyBuffer_Release(&shared);
    return PyLong_FromLong(seen);
}

static PyObject *pin(PyObject *self, PyObject *args)
{
    Py_buffer shared;
    Py_ssize_t i;
    long where = -1;
    unsigned char *b = job_bytes(args, &shared, &i);
    if (b == NULL)
        return NULL;
    if (__atomic_add_fetch(PINS(b, i), 1, __ATOMIC_SEQ_CST) == 0) {  /* 255 readers: wrapped */
        __atomic_sub_fetch(PINS(b, i), 1, __ATOMIC_SEQ_CST);
    } else if (__atomic_load_n(STATE(b, i), __ATOMIC_SEQ_CST) == VERIFIED) {
        where = __atomic_load_n(WHERE(b, i), __ATOMIC_RELAXED);
    } else {
        __atomic_sub_fetch(PINS(b, i), 1, __ATOMIC_SEQ_CST);
    }
    PyBuffer_Release(&shared);
    return PyLong_FromLong(where);
}

static PyObject *unpin(PyObject *self, PyObject *args)
{
    Py_buffer shared;
    Py_ssize_t i;
    unsigned char *b = job_bytes(args, &shared, &i);
    if (b == NULL)
        return NULL;
    __atomic_sub_fetch(PINS(b, i), 1, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&shared);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"read_sealed", read_sealed, METH_VARARGS, "Read and check a sealed chunk file with O_DIRECT."},
    {"store", store, METH_VARARGS, "FUSE_NOTIFY_STORE on a /dev/fuse descriptor."},
    {"stream", stream, METH_VARARGS, "read_sealed and store for many chunks, in C threads."},
    {"claim", claim, METH_VARARGS, "A job's state; a queued job is claimed for the caller."},
    {"pin", pin, METH_VARARGS, "The buffer holding a verified job's bytes, held until unpin; or -1."},
    {"unpin", unpin, METH_VARARGS, "Let the stream reuse a pinned job's buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dataplane", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dataplane(void)
{
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") != 0;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "OK", OK) || PyModule_AddIntConstant(m, "MISSING", MISSING)
                      || PyModule_AddIntConstant(m, "DAMAGED", DAMAGED)
                      || PyModule_AddIntConstant(m, "UNPUSHED", UNPUSHED)
                      || PyModule_AddIntConstant(m, "SKIPPED", SKIPPED)
                      || PyModule_AddIntConstant(m, "TAKEN", TAKEN)
                      || PyModule_AddIntConstant(m, "QUEUED", QUEUED)
                      || PyModule_AddIntConstant(m, "CLAIMED", CLAIMED)
                      || PyModule_AddIntConstant(m, "READING", READING)
                      || PyModule_AddIntConstant(m, "VERIFIED", VERIFIED)
                      || PyModule_AddIntConstant(m, "RELEASING", RELEASING)
                      || PyModule_AddIntConstant(m, "DONE", DONE)
                      || PyModule_AddIntConstant(m, "FAILED", FAILED)
                      || PyModule_AddIntConstant(m, "AVX2", have_avx2))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
