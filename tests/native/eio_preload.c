/* EIO on reads and writes of files (never stdin, stdout, stderr), as libfiu failure points
 * cae2/eio/read and cae2/eio/write that fiu-ctrl switches on and off in a running process.
 *
 * libfiu's own POSIX preload library wraps malloc through thread-local storage, which aborts Python
 * processes that load libraries with TLS of their own (triton, via torchvision): "double free
 * detected in tcache 2". This library wraps only the read and write calls; libfiu's run preload
 * (fiu_run_preload.so) provides the failure points' remote control. Built by tests/test_eio.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

int fiu_fail(const char *name);

#define WRAP(ret, name, point, params, args, fdarg)                         \
    ret name params {                                                        \
        static ret (*real) params;                                           \
        if (!real) real = (ret (*) params) dlsym(RTLD_NEXT, #name);         \
        if (fdarg > 2 && fiu_fail(point)) { errno = EIO; return -1; }        \
        return real args;                                                    \
    }

WRAP(ssize_t, read, "cae2/eio/read", (int fd, void *b, size_t n), (fd, b, n), fd)
WRAP(ssize_t, pread64, "cae2/eio/read", (int fd, void *b, size_t n, off_t o), (fd, b, n, o), fd)
WRAP(ssize_t, pread, "cae2/eio/read", (int fd, void *b, size_t n, off_t o), (fd, b, n, o), fd)
WRAP(ssize_t, preadv64, "cae2/eio/read", (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd)
WRAP(ssize_t, preadv, "cae2/eio/read", (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd)
WRAP(ssize_t, readv, "cae2/eio/read", (int fd, const struct iovec *v, int c), (fd, v, c), fd)
WRAP(ssize_t, write, "cae2/eio/write", (int fd, const void *b, size_t n), (fd, b, n), fd)
WRAP(ssize_t, pwrite64, "cae2/eio/write", (int fd, const void *b, size_t n, off_t o), (fd, b, n, o), fd)
WRAP(ssize_t, pwrite, "cae2/eio/write", (int fd, const void *b, size_t n, off_t o), (fd, b, n, o), fd)
WRAP(ssize_t, writev, "cae2/eio/write", (int fd, const struct iovec *v, int c), (fd, v, c), fd)
WRAP(ssize_t, pwritev64, "cae2/eio/write", (int fd, const struct iovec *v, int c, off_t o), (fd, v, c, o), fd)
