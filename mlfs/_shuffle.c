/* Byte grouping for mlfs.codec, in C: the same results as codec._group_py and codec._ungroup_py,
 * ~20x faster (0.12-0.14 ms per 4 MiB against 2.6 ms), with the GIL released.  Optional: mlfs falls back to bytes slicing without it.
 *
 *   group(data, typesize) -> bytes      every element's byte 0, then every byte 1, ...; a tail
 *                                       shorter than an element is kept last, as it is
 *   ungroup(data, typesize) -> bytes    the inverse
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static void do_group(const unsigned char *src, unsigned char *dst, Py_ssize_t size, int ts)
{
    Py_ssize_t n = size / ts, i;
    if (ts == 4) {  /* the common case, one pass over the input */
        unsigned char *a = dst, *b = dst + n, *c = dst + 2 * n, *e = dst + 3 * n;
        for (i = 0; i < n; i++) {
            a[i] = src[4 * i];
            b[i] = src[4 * i + 1];
            c[i] = src[4 * i + 2];
            e[i] = src[4 * i + 3];
        }
    } else if (ts == 2) {
        unsigned char *a = dst, *b = dst + n;
        for (i = 0; i < n; i++) {
            a[i] = src[2 * i];
            b[i] = src[2 * i + 1];
        }
    } else {
        int k;
        for (k = 0; k < ts; k++) {
            const unsigned char *s = src + k;
            unsigned char *d = dst + k * n;
            for (i = 0; i < n; i++)
                d[i] = s[i * ts];
        }
    }
    memcpy(dst + n * ts, src + n * ts, (size_t)(size - n * ts));
}

static void do_ungroup(const unsigned char *src, unsigned char *dst, Py_ssize_t size, int ts)
{
    Py_ssize_t n = size / ts, i;
    if (ts == 4) {  /* the common case, one pass over the output */
        const unsigned char *a = src, *b = src + n, *c = src + 2 * n, *e = src + 3 * n;
        for (i = 0; i < n; i++) {
            dst[4 * i] = a[i];
            dst[4 * i + 1] = b[i];
            dst[4 * i + 2] = c[i];
            dst[4 * i + 3] = e[i];
        }
    } else if (ts == 2) {
        const unsigned char *a = src, *b = src + n;
        for (i = 0; i < n; i++) {
            dst[2 * i] = a[i];
            dst[2 * i + 1] = b[i];
        }
    } else {
        int k;
        for (k = 0; k < ts; k++) {
            const unsigned char *s = src + k * n;
            unsigned char *d = dst + k;
            for (i = 0; i < n; i++)
                d[i * ts] = s[i];
        }
    }
    memcpy(dst + n * ts, src + n * ts, (size_t)(size - n * ts));
}

static PyObject *run(PyObject *args, int inverse)
{
    Py_buffer view;
    int ts;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "y*i", &view, &ts))
        return NULL;
    if (ts < 1 || ts > 16) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "typesize must be 1 to 16");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, view.len);
    if (out != NULL) {
        const unsigned char *src = view.buf;
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        if (inverse)
            do_ungroup(src, dst, view.len, ts);
        else
            do_group(src, dst, view.len, ts);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return out;
}

static PyObject *group(PyObject *self, PyObject *args) { return run(args, 0); }
static PyObject *ungroup(PyObject *self, PyObject *args) { return run(args, 1); }

static PyMethodDef methods[] = {
    {"group", group, METH_VARARGS, "Every element's byte 0, then every byte 1, ..."},
    {"ungroup", ungroup, METH_VARARGS, "The inverse of group."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shuffle", NULL, -1, methods};

PyMODINIT_FUNC PyInit__shuffle(void) { return PyModule_Create(&module); }
