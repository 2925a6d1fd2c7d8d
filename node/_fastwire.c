/* Native reply wait for the activation wire (node/wire.py).

Why: on a fast link (loopback, a LAN) a frame's reply arrives tens of microseconds after the frame's last
byte is written. Going back to the event loop for it costs more than that: the loop's own round (timers,
epoll, the protocol callback, the future, the task step) and, when the core has gone idle meanwhile, its
wake-up. A sender that polls its socket for a short while first gets the reply as soon as it lands
(benchmarks/pipeline.md: ~10% of a 1 MiB loopback hop). The wait runs without the GIL (the node's compute
thread goes on) and yields the core between tries (other runnable work on the core goes first); it
reports whether the core went to someone else meanwhile, because polling on a machine with more busy
processes than cores takes time from them (the caller then polls less). Optional: without this module the
sender awaits the reply on the event loop as before.

    recv_within(fd, max_bytes, budget_s) -> (bytes | None, contended: bool)
        Read what is there on the non-blocking socket ``fd`` (at most ``max_bytes``), polling for up to
        ``budget_s`` seconds: the bytes (b"" at end of stream), or None if none came in time; ``contended``:
        this thread was switched out while it polled (Linux; always False elsewhere). Raises OSError on a
        socket error.
*/
#define _GNU_SOURCE   /* RUSAGE_THREAD */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

static double monotonic_s(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Context switches of the calling thread so far; -1 where the platform does not count them per thread. */
static long thread_switches(void) {
#ifdef RUSAGE_THREAD
    struct rusage usage;
    if (getrusage(RUSAGE_THREAD, &usage) == 0)
        return usage.ru_nvcsw + usage.ru_nivcsw;
#endif
    return -1;
}

static PyObject *recv_within(PyObject *self, PyObject *args) {
    int fd;
    Py_ssize_t max_bytes;
    double budget_s;
    if (!PyArg_ParseTuple(args, "ind:recv_within", &fd, &max_bytes, &budget_s))
        return NULL;
    if (max_bytes <= 0 || max_bytes > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "max_bytes must be in 1..%d, got %zd", 1 << 20, max_bytes);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, max_bytes);
    if (out == NULL)
        return NULL;
    char *buf = PyBytes_AS_STRING(out);
    ssize_t got;
    int error = 0, contended = 0;
    Py_BEGIN_ALLOW_THREADS
    long switches = thread_switches();
    double deadline = monotonic_s() + budget_s;
    for (;;) {
        got = recv(fd, buf, (size_t)max_bytes, MSG_DONTWAIT);
        if (got >= 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            error = errno;
            break;
        }
        if (monotonic_s() >= deadline)
            break;
        sched_yield();
    }
    contended = switches >= 0 && thread_switches() != switches;
    Py_END_ALLOW_THREADS
    if (error) {
        Py_DECREF(out);
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (got < 0) {
        Py_DECREF(out);
        return Py_BuildValue("(OO)", Py_None, contended ? Py_True : Py_False);
    }
    if (_PyBytes_Resize(&out, got) < 0)
        return NULL;
    PyObject *result = Py_BuildValue("(OO)", out, contended ? Py_True : Py_False);
    Py_DECREF(out);
    return result;
}

static PyMethodDef methods[] = {
    {"recv_within", recv_within, METH_VARARGS, "Poll a non-blocking socket for bytes for up to budget_s seconds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastwire", "Native reply wait for the activation wire (see the C file).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastwire(void) { return PyModule_Create(&module); }
