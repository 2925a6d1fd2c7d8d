/* Native kernels for the activation codec's two per-hop passes over the payload (protocols/codec.py).

Why: on the activation wire a 1 MiB hop spends as long casting fp32 to bf16 (sender) and checking the
arrived values finite (receiver) as the socket spends moving the bytes; torch does each in one generic
pass with dispatch around it. These loops are plain C that the compiler vectorises (one build per x86-64
level, picked at load time), bit-exact with torch, and run without the GIL. Optional: when this module is
not built (no C compiler at install), codec.py does the same with torch.

    cast_f32_to_bf16(src, dst)   fp32 buffer -> bf16 bits in a writable buffer (round to nearest even,
                                 NaN -> 0x7FC0: what torch's .to(torch.bfloat16) gives)
    finite_f32(buf) / finite_bf16(buf) / finite_f16(buf) -> bool: no NaN or inf in the buffer
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void cast_bf16(const uint32_t *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = src[i];
        uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        dst[i] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : rounded;
    }
}

MULTIVERSION
static int finite_16(const uint16_t *p, size_t n, uint16_t exponent) {
    uint16_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= (uint16_t)((p[i] & exponent) == exponent);
    return !bad;
}

MULTIVERSION
static int finite_32(const uint32_t *p, size_t n) {
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= (uint32_t)((p[i] & 0x7F800000u) == 0x7F800000u);
    return !bad;
}

static int aligned(const Py_buffer *view, Py_ssize_t itemsize, const char *what) {
    if (view->len % itemsize != 0 || ((uintptr_t)view->buf) % (uintptr_t)itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes at an address not aligned to %zd-byte elements",
                     what, view->len, itemsize);
        return 0;
    }
    return 1;
}

static PyObject *cast_f32_to_bf16(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*:cast_f32_to_bf16", &src, &dst))
        return NULL;
    PyObject *result = NULL;
    if (aligned(&src, 4, "source") && aligned(&dst, 2, "destination")) {
        size_t n = (size_t)(src.len / 4);
        if (dst.len < src.len / 2) {
            PyErr_Format(PyExc_ValueError, "destination holds %zd bytes, the cast needs %zd", dst.len, src.len / 2);
        } else {
            Py_BEGIN_ALLOW_THREADS
            cast_bf16((const uint32_t *)src.buf, (uint16_t *)dst.buf, n);
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *all_finite(PyObject *args, const char *format, Py_ssize_t itemsize, uint16_t exponent) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, format, &buf))
        return NULL;
    PyObject *result = NULL;
    if (aligned(&buf, itemsize, "buffer")) {
        int ok;
        size_t n = (size_t)(buf.len / itemsize);
        Py_BEGIN_ALLOW_THREADS
        ok = itemsize == 4 ? finite_32((const uint32_t *)buf.buf, n) : finite_16((const uint16_t *)buf.buf, n, exponent);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(ok);
    }
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *finite_f32(PyObject *self, PyObject *args) { return all_finite(args, "y*:finite_f32", 4, 0); }
static PyObject *finite_bf16(PyObject *self, PyObject *args) { return all_finite(args, "y*:finite_bf16", 2, 0x7F80u); }
static PyObject *finite_f16(PyObject *self, PyObject *args) { return all_finite(args, "y*:finite_f16", 2, 0x7C00u); }

static PyMethodDef methods[] = {
    {"cast_f32_to_bf16", cast_f32_to_bf16, METH_VARARGS, "Cast an fp32 buffer to bf16 bits (round to nearest even)."},
    {"finite_f32", finite_f32, METH_VARARGS, "Whether an fp32 buffer holds no NaN or inf."},
    {"finite_bf16", finite_bf16, METH_VARARGS, "Whether a bf16 buffer holds no NaN or inf."},
    {"finite_f16", finite_f16, METH_VARARGS, "Whether an fp16 buffer holds no NaN or inf."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcodec", "Native codec kernels (see the C file).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastcodec(void) { return PyModule_Create(&module); }
