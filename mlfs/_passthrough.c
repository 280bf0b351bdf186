/* FUSE passthrough with a libfuse that does not know it (docs/adr/0035).
 *
 * Linux 6.9+ can serve an open FUSE file from a backing file: reads, and mmap faults, go to the
 * backing file's own page cache and never reach the daemon.  The daemon must (1) answer INIT with
 * FUSE_PASSTHROUGH and a max_stack_depth, (2) register the backing file with the
 * FUSE_DEV_IOC_BACKING_OPEN ioctl, and (3) answer OPEN with FOPEN_PASSTHROUGH and the backing id.
 * libfuse gained this in 3.16; Debian 12 has 3.14 and pyfuse3 3.5 has no call for it.  (2) is a
 * plain ioctl (mlfs/passthrough.py).  For (1) and (3), this module replaces two entries of
 * libfuse's global offset table, `read` and `writev`, with functions that call the real ones and:
 *
 * - on `read` from the session's descriptor, note the INIT request (the kernel's flags) and the
 *   `unique` of the last OPEN request, which the daemon's open handler asks for first thing
 *   (pyfuse3 reads a request and runs the handler's first steps before reading another);
 * - on `writev` to it, patch the INIT reply (add FUSE_PASSTHROUGH, max_stack_depth 1) if the
 *   kernel offered it, and patch exactly the OPEN replies the daemon named with `expect`
 *   (by unique and file handle): open_flags = FOPEN_PASSTHROUGH, backing_id.
 *
 * Nothing else is touched: any other message goes to the real writev as it came.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

/* linux/fuse.h (7.40+); Debian 12's headers predate passthrough. */
#define FUSE_OPEN 14
#define FUSE_INIT 26
#define IN_HEADER 40  /* struct fuse_in_header */
#define OUT_HEADER 16 /* struct fuse_out_header */
#define FUSE_INIT_EXT (1u << 30)
#define FUSE_PASSTHROUGH_HI (1u << 5) /* FUSE_PASSTHROUGH = 1ULL << 37, in flags2 */
#define FOPEN_PASSTHROUGH (1u << 7)
/* struct fuse_init_out: flags at 12, flags2 at 32, max_stack_depth at 36 */
#define INIT_OUT_MIN 40
#define OPEN_OUT 16 /* struct fuse_open_out: fh, open_flags, backing_id */

#if defined(__x86_64__)
#define JUMP_SLOT R_X86_64_JUMP_SLOT
#elif defined(__aarch64__)
#define JUMP_SLOT R_AARCH64_JUMP_SLOT
#else
#define JUMP_SLOT (-1) /* elsewhere nothing is patched: no passthrough */
#endif

static int fuse_fd = -1;
static int want;                      /* negotiate passthrough if offered */
static volatile uint64_t init_unique; /* 0 once answered */
static volatile int offered, negotiated;
static volatile uint64_t last_open;

/* OPEN replies to patch: a few slots are plenty (the daemon names a reply just before pyfuse3
 * writes it, in the same thread); the oldest is reused. */
#define SLOTS 64
static struct { uint64_t unique, fh; int32_t backing; } slots[SLOTS];
static unsigned next_slot;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile long patched_opens;

static ssize_t hook_read(int fd, void *buf, size_t n)
{
    ssize_t r = read(fd, buf, n);
    if (fd == fuse_fd && r >= IN_HEADER) {
        uint32_t opcode;
        uint64_t unique;
        memcpy(&opcode, (char *)buf + 4, 4);
        memcpy(&unique, (char *)buf + 8, 8);
        if (opcode == FUSE_OPEN) {
            last_open = unique;
        } else if (opcode == FUSE_INIT && r >= IN_HEADER + 20) {
            uint32_t in[5]; /* major, minor, max_readahead, flags, flags2 */
            memcpy(in, (char *)buf + IN_HEADER, sizeof in);
            offered = (in[3] & FUSE_INIT_EXT) && (in[4] & FUSE_PASSTHROUGH_HI);
            init_unique = unique;
        }
    }
    return r;
}

/* The whole message in one buffer, or 0 if it is larger than *cap*. */
static size_t gather(const struct iovec *iov, int cnt, char *out, size_t cap)
{
    size_t len = 0;
    for (int i = 0; i < cnt; i++) {
        if (len + iov[i].iov_len > cap)
            return 0;
        memcpy(out + len, iov[i].iov_base, iov[i].iov_len);
        len += iov[i].iov_len;
    }
    return len;
}

static ssize_t hook_writev(int fd, const struct iovec *iov, int cnt)
{
    if (fd != fuse_fd || cnt < 1 || iov[0].iov_len < OUT_HEADER)
        return writev(fd, iov, cnt);
    int32_t error;
    uint64_t unique;
    memcpy(&error, (char *)iov[0].iov_base + 4, 4);
    memcpy(&unique, (char *)iov[0].iov_base + 8, 8);
    if (error != 0 || unique == 0)
        return writev(fd, iov, cnt);
    char msg[256];
    if (unique == init_unique) {
        init_unique = 0;
        size_t len;
        if (!want || !offered || !(len = gather(iov, cnt, msg, sizeof msg))
            || len < OUT_HEADER + INIT_OUT_MIN)
            return writev(fd, iov, cnt);
        uint32_t *out = (uint32_t *)(msg + OUT_HEADER);
        out[3] |= FUSE_INIT_EXT;
        out[8] |= FUSE_PASSTHROUGH_HI;
        out[9] = 1; /* backing files on a plain file system (stack depth 0) */
        struct iovec one = {msg, len};
        ssize_t r = writev(fd, &one, 1);
        if (r == (ssize_t)len)
            negotiated = 1;
        return r;
    }
    if (!negotiated)
        return writev(fd, iov, cnt);
    int found = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++)
        if (slots[i].unique == unique) {
            found = i;
            break;
        }
    pthread_mutex_unlock(&lock);
    if (found < 0)
        return writev(fd, iov, cnt);
    size_t len = gather(iov, cnt, msg, sizeof msg);
    uint64_t fh;
    if (len == OUT_HEADER + OPEN_OUT)
        memcpy(&fh, msg + OUT_HEADER, 8);
    pthread_mutex_lock(&lock);
    int match = len == OUT_HEADER + OPEN_OUT && slots[found].unique == unique
                && slots[found].fh == fh;
    int32_t backing = slots[found].backing;
    if (slots[found].unique == unique)
        slots[found].unique = 0;
    pthread_mutex_unlock(&lock);
    if (!match)
        return writev(fd, iov, cnt);
    uint32_t flags = FOPEN_PASSTHROUGH;
    memcpy(msg + OUT_HEADER + 8, &flags, 4);
    memcpy(msg + OUT_HEADER + 12, &backing, 4);
    struct iovec one = {msg, len};
    ssize_t r = writev(fd, &one, 1);
    if (r == (ssize_t)len)
        __atomic_add_fetch(&patched_opens, 1, __ATOMIC_RELAXED);
    return r;
}

static int patch_object(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    int *done = data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "libfuse3.so"))
        return 0;
    ElfW(Addr) base = info->dlpi_addr;
    ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
            dyn = (ElfW(Dyn) *)(base + info->dlpi_phdr[i].p_vaddr);
    if (!dyn)
        return 1;
    ElfW(Rela) *rel = NULL;
    size_t relsz = 0;
    ElfW(Sym) *sym = NULL;
    const char *str = NULL;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        ElfW(Addr) p = dyn->d_un.d_ptr;
        switch (dyn->d_tag) {
        case DT_JMPREL: rel = (void *)(p < base ? p + base : p); break;
        case DT_PLTRELSZ: relsz = dyn->d_un.d_val; break;
        case DT_SYMTAB: sym = (void *)(p < base ? p + base : p); break;
        case DT_STRTAB: str = (void *)(p < base ? p + base : p); break;
        }
    }
    if (!rel || !sym || !str)
        return 1;
    long page = sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < relsz / sizeof *rel; i++) {
        if ((long)ELF64_R_TYPE(rel[i].r_info) != (long)JUMP_SLOT)
            continue;
        const char *name = str + sym[ELF64_R_SYM(rel[i].r_info)].st_name;
        void *fn = !strcmp(name, "read") ? (void *)hook_read
                   : !strcmp(name, "writev") ? (void *)hook_writev : NULL;
        if (!fn)
            continue;
        void **slot = (void **)(base + rel[i].r_offset);
        void *start = (void *)((uintptr_t)slot & ~(uintptr_t)(page - 1));
        if (mprotect(start, page, PROT_READ | PROT_WRITE) != 0)
            return 1;
        *slot = fn;
        mprotect(start, page, PROT_READ); /* back under RELRO */
        (*done)++;
    }
    return 1;
}

static PyObject *install(PyObject *self, PyObject *args)
{
    int fd, w;
    if (!PyArg_ParseTuple(args, "ip", &fd, &w))
        return NULL;
    if (fuse_fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "already installed");
        return NULL;
    }
    int done = 0;
    fuse_fd = fd;
    want = w;
    dl_iterate_phdr(patch_object, &done);
    if (done != 2) /* both or neither: a half-patched libfuse would only see one side */
        fuse_fd = -1;
    return PyLong_FromLong(done);
}

static PyObject *last_open_unique(PyObject *self, PyObject *noargs)
{
    return PyLong_FromUnsignedLongLong(last_open);
}

static PyObject *expect(PyObject *self, PyObject *args)
{
    unsigned long long unique, fh;
    int backing;
    if (!PyArg_ParseTuple(args, "KKi", &unique, &fh, &backing))
        return NULL;
    pthread_mutex_lock(&lock);
    unsigned i = next_slot++ % SLOTS;
    slots[i].unique = unique;
    slots[i].fh = fh;
    slots[i].backing = backing;
    pthread_mutex_unlock(&lock);
    Py_RETURN_NONE;
}

static PyObject *state(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:O,s:O,s:l}", "offered", offered ? Py_True : Py_False,
                         "negotiated", negotiated ? Py_True : Py_False,
                         "opens", (long)patched_opens);
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "Hook libfuse's read and writev on the session's descriptor."},
    {"last_open", last_open_unique, METH_NOARGS, "The unique of the last OPEN request read."},
    {"expect", expect, METH_VARARGS, "Answer this OPEN (unique, fh) with passthrough to a backing id."},
    {"state", state, METH_NOARGS, "Offered, negotiated, and OPEN replies patched."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_passthrough", NULL, -1, methods};

PyMODINIT_FUNC PyInit__passthrough(void) { return PyModule_Create(&module); }
