/* slow_flush: a disk whose every flush takes longer, for benchmarks (LD_PRELOAD).
 *
 *   gcc -O2 -shared -fPIC -o slow_flush.so bench/slow_flush.c -ldl
 *   LD_PRELOAD=$PWD/slow_flush.so SLOW_FLUSH_MS=5 program ...
 *
 * fsync, fdatasync, syncfs and sync_file_range(SYNC_FILE_RANGE_WAIT_AFTER)
 * first do what they do, then sleep SLOW_FLUSH_MS milliseconds (a decimal,
 * e.g. 0.5; unset or 0: no delay) before returning, as a disk whose cache
 * flush takes that long would: the caller waits, other processes and
 * threads run. Only the flushes wait; writes and reads are not touched.
 * SQLite (unixSync: fdatasync) and Python's os.fsync/os.fdatasync go
 * through these libc calls.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long delay_ns = -1;

static void slow(void)
{
    if (delay_ns < 0) {
        const char *ms = getenv("SLOW_FLUSH_MS");
        delay_ns = ms ? (long)(strtod(ms, NULL) * 1e6) : 0;
    }
    if (delay_ns > 0) {
        int saved = errno;
        struct timespec t = {delay_ns / 1000000000L, delay_ns % 1000000000L};
        while (nanosleep(&t, &t) == -1 && errno == EINTR)
            ;
        errno = saved;
    }
}

#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int fsync(int fd)
{
    int rc = NEXT(fsync)(fd);
    slow();
    return rc;
}

int fdatasync(int fd)
{
    int rc = NEXT(fdatasync)(fd);
    slow();
    return rc;
}

int syncfs(int fd)
{
    int rc = NEXT(syncfs)(fd);
    slow();
    return rc;
}

int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
{
    int rc = NEXT(sync_file_range)(fd, offset, nbytes, flags);
    if (flags & SYNC_FILE_RANGE_WAIT_AFTER)
        slow();
    return rc;
}
