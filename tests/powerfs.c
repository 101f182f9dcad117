/*
 * powerfs: a FUSE passthrough file system that simulates power loss
 * (modelled on LazyFS). Used by tests/powerfs.py and tests/test_powerfs.py.
 *
 *   powerfs BACKING MOUNTPOINT [fuse options]
 *   gcc -O2 -Wall -o powerfs powerfs.c $(pkg-config fuse3 --cflags --libs) -lpthread
 *
 * BACKING's tree is served at MOUNTPOINT, always with allow_other and
 * default_permissions, and no kernel attribute or entry caching.
 *
 * Semantics (BACKING is "the disk"; this process's memory is the page cache):
 * - Data: a write goes to an in-memory cache of 4096-byte pages only (a page
 *   not yet cached is first read from the backing file). Reads see the cache
 *   over the backing file. A file's size is the larger of the backing size and
 *   the end of its cached writes. fsync/fdatasync (and every write of a handle
 *   opened O_SYNC/O_DSYNC) write the file's dirty pages to the backing file, up
 *   to its size, then drop them; the backing file itself is not fsynced.
 *   The cache is keyed by the backing file's (st_dev, st_ino), so renames and
 *   hard links share it; it outlives close() (as a page cache does) and is
 *   dropped when the file is unlinked and no longer open.
 * - Metadata (create, mkdir, unlink, rename, truncate, chmod, chown, utimens,
 *   symlink, link, rmdir) goes straight to BACKING and is durable at once: a
 *   simplification, a real file system may lose those too. A truncate also
 *   drops cached pages past the new size. New files, directories and symlinks
 *   belong to the caller's uid/gid (the directory's gid if it is setgid).
 *   Data writes do not update the backing mtime until they are flushed.
 * - Locks: no lock ops, so the kernel keeps fcntl and flock locks itself.
 * - Kernel caching: regular files are opened direct_io (every read and write
 *   comes here; a MAP_SHARED mmap of them fails with ENODEV, so SQLite's
 *   mmap_size must stay 0, its default), except files whose name ends in
 *   "-shm": libfuse 3.14 cannot ask for FUSE_DIRECT_IO_ALLOW_MMAP, and SQLite
 *   maps its -shm MAP_SHARED. Those use the kernel page cache, which is never
 *   kept across opens (no keep_cache) and is invalidated at each cut; kernel
 *   writeback through a handle from before the cut is dropped without error.
 *   Processes from before a cut are dead in this model: kill them before
 *   "on" (a live one's later mmap stores could be written back through a
 *   new handle).
 * - Control: the virtual file /.powerfs (not listed). One write(2) of a
 *   command runs it before the write returns, under the one mutex every
 *   operation holds:
 *     cut            power cut: every dirty page is thrown away; then every
 *                    operation except on /.powerfs (and getattr of the root,
 *                    so that /.powerfs stays reachable) fails with EIO.
 *     cut torn SEED  the same, but first each dirty page is written to the
 *                    backing file with probability 1/2 (a PRNG seeded by SEED,
 *                    files in path order), and one of those pages only up to
 *                    a random multiple of 512 bytes.
 *     on             power back on: the cache is empty; new opens work.
 *                    Handles opened before the cut fail with EIO forever.
 *   A cut while off, or "on" while on, does nothing; anything else: EINVAL.
 *   Reading it gives one line: state=on|off dirty_pages=N files=N flushes=N
 *   flushed_pages=N cuts=N last_cut_dirty=N last_cut_written=N.
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <fuse.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <unistd.h>

#define PAGE 4096
#define CTL "/.powerfs"

struct file {
	dev_t dev;
	ino_t ino;
	int fd;			/* the backing file, O_RDWR when possible; pins the inode */
	int refs;		/* open handles */
	off_t size;		/* end of cached writes, or the last truncate */
	char **pages;		/* pages[i]: dirty page i, or NULL */
	size_t cap, ndirty;
	char path[PATH_MAX];	/* last opened as; orders torn cuts */
	struct file *next;
};

enum kind { K_FILE, K_DIR, K_CTL };

struct handle {
	enum kind kind;
	unsigned long epoch;	/* power cycle it was opened in */
	struct file *f;
	int sync;
	DIR *dir;
	char status[512];
};

static pthread_mutex_t big = PTHREAD_MUTEX_INITIALIZER;
static char root[PATH_MAX];
static int off;
static unsigned long epoch, flushes, flushed_pages, cuts;
static size_t last_cut_dirty, last_cut_written;
static struct file *files;
static char **shm_paths;	/* page-cached files opened since power-on */
static size_t nshm;

static int bpath(char *out, const char *path)
{
	if (!path)
		return -ENOENT;
	if (snprintf(out, PATH_MAX, "%s%s", root, path) >= PATH_MAX)
		return -ENAMETOOLONG;
	return 0;
}

static int is_ctl(const char *path)
{
	return path && strcmp(path, CTL) == 0;
}

static struct handle *handle_of(struct fuse_file_info *fi)
{
	return fi ? (struct handle *)(uintptr_t)fi->fh : NULL;
}

static int stale(const struct handle *h)
{
	return off || h->epoch != epoch;
}

/* ---- the page cache ---- */

static struct file *find(dev_t dev, ino_t ino)
{
	for (struct file *f = files; f; f = f->next)
		if (f->dev == dev && f->ino == ino)
			return f;
	return NULL;
}

static struct file *find_path(const char *bp)
{
	struct stat st;
	if (lstat(bp, &st) < 0 || !S_ISREG(st.st_mode))
		return NULL;
	return find(st.st_dev, st.st_ino);
}

static void drop_pages(struct file *f)
{
	for (size_t i = 0; i < f->cap; i++)
		free(f->pages[i]);
	free(f->pages);
	f->pages = NULL;
	f->cap = f->ndirty = 0;
}

/* Frees f if nothing needs it: no open handle, no dirty page. */
static void forget_if_unused(struct file *f)
{
	if (f->refs > 0 || f->ndirty > 0)
		return;
	for (struct file **p = &files; *p; p = &(*p)->next)
		if (*p == f) {
			*p = f->next;
			break;
		}
	drop_pages(f);
	close(f->fd);
	free(f);
}

static off_t backing_size(struct file *f)
{
	struct stat st;
	return fstat(f->fd, &st) < 0 ? 0 : st.st_size;
}

static off_t logical_size(struct file *f)
{
	off_t b = backing_size(f);
	return b > f->size ? b : f->size;
}

/* Reads backing bytes [pos, pos+n), zeros past its end. */
static int backing_read(struct file *f, char *dst, size_t n, off_t pos)
{
	size_t done = 0;
	while (done < n) {
		ssize_t r = pread(f->fd, dst + done, n - done, pos + done);
		if (r < 0)
			return -errno;
		if (r == 0)
			break;
		done += r;
	}
	memset(dst + done, 0, n - done);
	return 0;
}

static int backing_write(struct file *f, const char *src, size_t n, off_t pos)
{
	size_t done = 0;
	while (done < n) {
		ssize_t r = pwrite(f->fd, src + done, n - done, pos + done);
		if (r < 0)
			return -errno;
		done += r;
	}
	return 0;
}

static char *page_for_write(struct file *f, size_t i, int *err)
{
	if (i >= f->cap) {
		size_t cap = f->cap ? f->cap : 16;
		while (cap <= i)
			cap *= 2;
		char **p = realloc(f->pages, cap * sizeof *p);
		if (!p) {
			*err = -ENOMEM;
			return NULL;
		}
		memset(p + f->cap, 0, (cap - f->cap) * sizeof *p);
		f->pages = p;
		f->cap = cap;
	}
	if (!f->pages[i]) {
		char *page = malloc(PAGE);
		if (!page) {
			*err = -ENOMEM;
			return NULL;
		}
		*err = backing_read(f, page, PAGE, (off_t)i * PAGE);
		if (*err) {
			free(page);
			return NULL;
		}
		f->pages[i] = page;
		f->ndirty++;
	}
	return f->pages[i];
}

static int cache_read(struct file *f, char *buf, size_t size, off_t pos)
{
	off_t end = logical_size(f);
	if (pos >= end)
		return 0;
	if ((off_t)size > end - pos)
		size = end - pos;
	size_t done = 0;
	while (done < size) {
		off_t at = pos + done;
		size_t i = at / PAGE, in = at % PAGE, n = PAGE - in;
		if (n > size - done)
			n = size - done;
		if (i < f->cap && f->pages[i]) {
			memcpy(buf + done, f->pages[i] + in, n);
		} else {
			int err = backing_read(f, buf + done, n, at);
			if (err)
				return err;
		}
		done += n;
	}
	return size;
}

static int cache_write(struct file *f, const char *buf, size_t size, off_t pos)
{
	size_t done = 0;
	while (done < size) {
		off_t at = pos + done;
		size_t i = at / PAGE, in = at % PAGE, n = PAGE - in;
		int err = 0;
		if (n > size - done)
			n = size - done;
		char *page = page_for_write(f, i, &err);
		if (!page)
			return err;
		memcpy(page + in, buf + done, n);
		done += n;
	}
	if (pos + (off_t)size > f->size)
		f->size = pos + size;
	return size;
}

/* Writes f's dirty pages to the backing file, up to its size, and drops them. */
static int cache_flush(struct file *f)
{
	off_t end = logical_size(f);
	size_t written = 0;
	for (size_t i = 0; i < f->cap; i++) {
		if (!f->pages[i])
			continue;
		off_t at = (off_t)i * PAGE;
		if (at < end) {
			int err = backing_write(f, f->pages[i], end - at < PAGE ? end - at : PAGE, at);
			if (err)
				return err;
		}
		free(f->pages[i]);
		f->pages[i] = NULL;
		f->ndirty--;
		written++;
	}
	if (backing_size(f) < end && ftruncate(f->fd, end) < 0)
		return -errno;
	flushed_pages += written;
	return 0;
}

/* After the backing file was truncated to size: the cache follows. */
static void cache_truncate(struct file *f, off_t size)
{
	size_t keep = (size + PAGE - 1) / PAGE;
	for (size_t i = keep; i < f->cap; i++)
		if (f->pages[i]) {
			free(f->pages[i]);
			f->pages[i] = NULL;
			f->ndirty--;
		}
	if (size % PAGE && (size_t)(size / PAGE) < f->cap && f->pages[size / PAGE])
		memset(f->pages[size / PAGE] + size % PAGE, 0, PAGE - size % PAGE);
	f->size = size;
}

/* ---- power ---- */

static uint64_t rng_state;

static uint64_t rng(void)	/* splitmix64: the same sequence everywhere */
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static int by_path(const void *a, const void *b)
{
	const struct file *x = *(struct file *const *)a, *y = *(struct file *const *)b;
	int c = strcmp(x->path, y->path);
	if (c)
		return c;
	return x->ino < y->ino ? -1 : x->ino > y->ino;
}

/* The disk writes about half of the dirty pages, in no order; one is torn. */
static size_t write_torn(uint64_t seed)
{
	size_t nfiles = 0, nchosen = 0, n = 0;
	for (struct file *f = files; f; f = f->next)
		nfiles++;
	struct file **sorted = calloc(nfiles + 1, sizeof *sorted);
	struct { struct file *f; size_t i; off_t end; } *chosen = NULL;
	if (!sorted)
		return 0;
	for (struct file *f = files; f; f = f->next)
		sorted[n++] = f;
	qsort(sorted, nfiles, sizeof *sorted, by_path);
	rng_state = seed;
	for (size_t k = 0; k < nfiles; k++) {
		struct file *f = sorted[k];
		off_t end = logical_size(f);
		for (size_t i = 0; i < f->cap; i++) {
			if (!f->pages[i] || !(rng() & 1))
				continue;
			void *p = realloc(chosen, (nchosen + 1) * sizeof *chosen);
			if (!p)
				break;
			chosen = p;
			chosen[nchosen].f = f;
			chosen[nchosen].i = i;
			chosen[nchosen].end = end;
			nchosen++;
		}
	}
	size_t torn = nchosen ? rng() % nchosen : 0;
	for (size_t k = 0; k < nchosen; k++) {
		struct file *f = chosen[k].f;
		off_t at = (off_t)chosen[k].i * PAGE;
		off_t len = chosen[k].end - at < PAGE ? chosen[k].end - at : PAGE;
		if (k == torn) {
			off_t prefix = 512 * (off_t)(1 + rng() % 7);
			if (prefix < len)
				len = prefix;
		}
		if (len > 0)
			backing_write(f, f->pages[chosen[k].i], len, at);
	}
	free(chosen);
	free(sorted);
	return nchosen;
}

static void power_cut(int torn, uint64_t seed)
{
	size_t dirty = 0;
	for (struct file *f = files; f; f = f->next)
		dirty += f->ndirty;
	last_cut_written = torn ? write_torn(seed) : 0;
	last_cut_dirty = dirty;
	for (struct file *f = files, *next; f; f = next) {
		next = f->next;
		drop_pages(f);
		f->size = 0;
		forget_if_unused(f);
	}
	off = 1;
	epoch++;
	cuts++;
}

/* Runs one command written to /.powerfs; called with big held. */
static int control(const char *buf, size_t size)
{
	char cmd[128], *end;
	if (size >= sizeof cmd)
		return -EINVAL;
	memcpy(cmd, buf, size);
	cmd[size] = 0;
	while (size && (cmd[size - 1] == '\n' || cmd[size - 1] == ' '))
		cmd[--size] = 0;
	if (strcmp(cmd, "on") == 0) {
		off = 0;
		return 0;
	}
	if (strcmp(cmd, "cut") == 0) {
		if (!off)
			power_cut(0, 0);
		return 0;
	}
	if (strncmp(cmd, "cut torn ", 9) == 0 && cmd[9] >= '0' && cmd[9] <= '9') {
		errno = 0;
		uint64_t seed = strtoull(cmd + 9, &end, 10);
		if (errno || *end)
			return -EINVAL;
		if (!off)
			power_cut(1, seed);
		return 0;
	}
	return -EINVAL;
}

static void status_line(char *out, size_t n)
{
	size_t dirty = 0, nfiles = 0;
	for (struct file *f = files; f; f = f->next) {
		dirty += f->ndirty;
		nfiles++;
	}
	snprintf(out, n,
		 "state=%s dirty_pages=%zu files=%zu flushes=%lu flushed_pages=%lu cuts=%lu "
		 "last_cut_dirty=%zu last_cut_written=%zu\n",
		 off ? "off" : "on", dirty, nfiles, flushes, flushed_pages, cuts, last_cut_dirty,
		 last_cut_written);
}

/* ---- operations ---- */

#define LOCKED(expr)                      \
	do {                              \
		pthread_mutex_lock(&big); \
		int r_ = (expr);          \
		pthread_mutex_unlock(&big); \
		return r_;                \
	} while (0)

/* Gives a new object the caller's uid, and gid unless its directory is setgid. */
static int own(const char *bp, int fd)
{
	struct fuse_context *ctx = fuse_get_context();
	char dir[PATH_MAX];
	struct stat st;
	gid_t gid = ctx->gid;
	snprintf(dir, sizeof dir, "%s", bp);
	if (stat(dirname(dir), &st) == 0 && (st.st_mode & S_ISGID))
		gid = (gid_t)-1;
	int r = fd >= 0 ? fchown(fd, ctx->uid, gid) : lchown(bp, ctx->uid, gid);
	return r < 0 ? -errno : 0;
}

static int do_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	struct handle *h = handle_of(fi);
	if (is_ctl(path) || (h && h->kind == K_CTL)) {
		memset(st, 0, sizeof *st);
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
		st->st_uid = getuid();
		st->st_gid = getgid();
		return 0;
	}
	if (off && !(path && strcmp(path, "/") == 0))
		return -EIO;
	if (h && h->kind == K_FILE) {
		if (stale(h))
			return -EIO;
		if (fstat(h->f->fd, st) < 0)
			return -errno;
	} else {
		int err = bpath(bp, path);
		if (err)
			return err;
		if (lstat(bp, st) < 0)
			return -errno;
	}
	struct file *f = S_ISREG(st->st_mode) ? find(st->st_dev, st->st_ino) : NULL;
	if (f && f->size > st->st_size)
		st->st_size = f->size;
	return 0;
}

static int pfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	LOCKED(do_getattr(path, st, fi));
}

/* Checks for path operations: -EIO when off, -EPERM on the control file. */
static int path_op(const char *path, char *bp)
{
	if (off)
		return -EIO;
	if (is_ctl(path))
		return -EPERM;
	return bpath(bp, path);
}

static int do_readlink(const char *path, char *buf, size_t size)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	ssize_t n = readlink(bp, buf, size - 1);
	if (n < 0)
		return -errno;
	buf[n] = 0;
	return 0;
}

static int pfs_readlink(const char *path, char *buf, size_t size)
{
	LOCKED(do_readlink(path, buf, size));
}

static int do_mknod(const char *path, mode_t mode, dev_t rdev)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	if (mknod(bp, mode, rdev) < 0)
		return -errno;
	return own(bp, -1);
}

static int pfs_mknod(const char *path, mode_t mode, dev_t rdev)
{
	LOCKED(do_mknod(path, mode, rdev));
}

static int do_mkdir(const char *path, mode_t mode)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	if (mkdir(bp, mode) < 0)
		return -errno;
	return own(bp, -1);
}

static int pfs_mkdir(const char *path, mode_t mode)
{
	LOCKED(do_mkdir(path, mode));
}

/* A name of a regular file went away: its cache goes too if nothing holds it. */
static void name_removed(const struct stat *before)
{
	struct file *f;
	if (!S_ISREG(before->st_mode) || before->st_nlink != 1)
		return;
	f = find(before->st_dev, before->st_ino);
	if (f && f->refs == 0) {
		drop_pages(f);
		forget_if_unused(f);
	}
}

static int do_unlink(const char *path)
{
	char bp[PATH_MAX];
	struct stat st;
	int err = path_op(path, bp);
	if (err)
		return err;
	if (lstat(bp, &st) < 0 || unlink(bp) < 0)
		return -errno;
	name_removed(&st);
	return 0;
}

static int pfs_unlink(const char *path)
{
	LOCKED(do_unlink(path));
}

static int do_rmdir(const char *path)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	return rmdir(bp) < 0 ? -errno : 0;
}

static int pfs_rmdir(const char *path)
{
	LOCKED(do_rmdir(path));
}

static int do_symlink(const char *target, const char *path)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	if (symlink(target, bp) < 0)
		return -errno;
	return own(bp, -1);
}

static int pfs_symlink(const char *target, const char *path)
{
	LOCKED(do_symlink(target, path));
}

static int do_rename(const char *from, const char *to, unsigned int flags)
{
	char a[PATH_MAX], b[PATH_MAX];
	struct stat src, dst;
	int err = path_op(from, a);
	if (!err)
		err = path_op(to, b);
	if (err)
		return err;
	if (lstat(a, &src) < 0)
		return -errno;
	int replaced = lstat(b, &dst) == 0;
	if (renameat2(AT_FDCWD, a, AT_FDCWD, b, flags) < 0)
		return -errno;
	if (replaced && !(flags & RENAME_EXCHANGE) &&
	    !(dst.st_dev == src.st_dev && dst.st_ino == src.st_ino))
		name_removed(&dst);
	return 0;
}

static int pfs_rename(const char *from, const char *to, unsigned int flags)
{
	LOCKED(do_rename(from, to, flags));
}

static int do_link(const char *from, const char *to)
{
	char a[PATH_MAX], b[PATH_MAX];
	int err = path_op(from, a);
	if (!err)
		err = path_op(to, b);
	if (err)
		return err;
	return link(a, b) < 0 ? -errno : 0;
}

static int pfs_link(const char *from, const char *to)
{
	LOCKED(do_link(from, to));
}

/* The open file of fi, or NULL to go by path; *err is set when fi is stale. */
static struct file *open_file(struct fuse_file_info *fi, int *err)
{
	struct handle *h = handle_of(fi);
	*err = 0;
	if (!h || h->kind != K_FILE)
		return NULL;
	if (stale(h))
		*err = -EIO;
	return h->f;
}

static int do_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	int err;
	struct file *f = open_file(fi, &err);
	if (err)
		return err;
	if (f && !off)
		return fchmod(f->fd, mode) < 0 ? -errno : 0;
	if ((err = path_op(path, bp)))
		return err;
	return chmod(bp, mode) < 0 ? -errno : 0;
}

static int pfs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	LOCKED(do_chmod(path, mode, fi));
}

static int do_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	int err;
	struct file *f = open_file(fi, &err);
	if (err)
		return err;
	if (f && !off)
		return fchown(f->fd, uid, gid) < 0 ? -errno : 0;
	if ((err = path_op(path, bp)))
		return err;
	return lchown(bp, uid, gid) < 0 ? -errno : 0;
}

static int pfs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	LOCKED(do_chown(path, uid, gid, fi));
}

static int do_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	int err;
	if (is_ctl(path) || (handle_of(fi) && handle_of(fi)->kind == K_CTL))
		return 0;	/* `echo cut > .powerfs` truncates it first */
	struct file *f = open_file(fi, &err);
	if (err)
		return err;
	if (f && !off) {
		if (ftruncate(f->fd, size) < 0)
			return -errno;
	} else {
		if ((err = path_op(path, bp)))
			return err;
		if (truncate(bp, size) < 0)
			return -errno;
		f = find_path(bp);
	}
	if (f)
		cache_truncate(f, size);
	return 0;
}

static int pfs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	LOCKED(do_truncate(path, size, fi));
}

static int do_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	int err;
	struct file *f = open_file(fi, &err);
	if (err)
		return err;
	if (f && !off)
		return futimens(f->fd, tv) < 0 ? -errno : 0;
	if ((err = path_op(path, bp)))
		return err;
	return utimensat(AT_FDCWD, bp, tv, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int pfs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	LOCKED(do_utimens(path, tv, fi));
}

static int ends_with(const char *s, const char *tail)
{
	size_t n = strlen(s), m = strlen(tail);
	return n >= m && strcmp(s + n - m, tail) == 0;
}

static void remember_page_cached(const char *path)
{
	for (size_t i = 0; i < nshm; i++)
		if (strcmp(shm_paths[i], path) == 0)
			return;
	char **p = realloc(shm_paths, (nshm + 1) * sizeof *p);
	if (!p)
		return;
	shm_paths = p;
	if ((p[nshm] = strdup(path)))
		nshm++;
}

/* Makes the handle of a freshly opened backing fd (which it takes over). */
static int attach(const char *path, int fd, struct fuse_file_info *fi)
{
	struct stat st;
	int err = fstat(fd, &st) < 0 ? -errno : !S_ISREG(st.st_mode) ? -EOPNOTSUPP : 0;
	struct handle *h = err ? NULL : calloc(1, sizeof *h);
	if (!h) {
		close(fd);
		return err ? err : -ENOMEM;
	}
	struct file *f = find(st.st_dev, st.st_ino);
	if (f) {
		close(fd);
	} else {
		f = calloc(1, sizeof *f);
		if (!f) {
			free(h);
			close(fd);
			return -ENOMEM;
		}
		f->dev = st.st_dev;
		f->ino = st.st_ino;
		f->fd = fd;
		f->next = files;
		files = f;
	}
	snprintf(f->path, sizeof f->path, "%s", path);
	f->refs++;
	if (fi->flags & O_TRUNC)
		cache_truncate(f, 0);
	h->kind = K_FILE;
	h->epoch = epoch;
	h->f = f;
	h->sync = (fi->flags & (O_SYNC | O_DSYNC)) != 0;
	fi->fh = (uintptr_t)h;
	fi->keep_cache = 0;
	fi->direct_io = !ends_with(path, "-shm");
	if (!fi->direct_io)
		remember_page_cached(path);
	return 0;
}

static int do_open(const char *path, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	if (is_ctl(path)) {
		struct handle *h = calloc(1, sizeof *h);
		if (!h)
			return -ENOMEM;
		h->kind = K_CTL;
		status_line(h->status, sizeof h->status);
		fi->fh = (uintptr_t)h;
		fi->direct_io = 1;
		return 0;
	}
	int err = path_op(path, bp);
	if (err)
		return err;
	int trunc = fi->flags & O_TRUNC;
	int fd = open(bp, O_RDWR | O_CLOEXEC | trunc);
	if (fd < 0 && (errno == EACCES || errno == EPERM || errno == EROFS || errno == ETXTBSY))
		fd = open(bp, (fi->flags & O_ACCMODE) | O_CLOEXEC | trunc);
	if (fd < 0)
		return -errno;
	return attach(path, fd, fi);
}

static int pfs_open(const char *path, struct fuse_file_info *fi)
{
	LOCKED(do_open(path, fi));
}

static int do_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	if (is_ctl(path))
		return -EEXIST;
	int err = path_op(path, bp);
	if (err)
		return err;
	/* Only a file made here gets the caller as owner, not one that raced in. */
	int fd = open(bp, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL, mode);
	if (fd >= 0) {
		if ((err = own(bp, fd))) {
			close(fd);
			return err;
		}
	} else if (errno == EEXIST && !(fi->flags & O_EXCL)) {
		fd = open(bp, O_RDWR | O_CLOEXEC | (fi->flags & O_TRUNC));
	}
	if (fd < 0)
		return -errno;
	return attach(path, fd, fi);
}

static int pfs_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	LOCKED(do_create(path, mode, fi));
}

static int do_read(char *buf, size_t size, off_t pos, struct fuse_file_info *fi)
{
	struct handle *h = handle_of(fi);
	if (h->kind == K_CTL) {
		size_t len = strlen(h->status);
		if (pos >= (off_t)len)
			return 0;
		if (size > len - pos)
			size = len - pos;
		memcpy(buf, h->status + pos, size);
		return size;
	}
	if (stale(h))
		return -EIO;
	return cache_read(h->f, buf, size, pos);
}

static int pfs_read(const char *path, char *buf, size_t size, off_t pos,
		    struct fuse_file_info *fi)
{
	(void)path;
	LOCKED(do_read(buf, size, pos, fi));
}

static int do_write(const char *buf, size_t size, off_t pos, struct fuse_file_info *fi)
{
	struct handle *h = handle_of(fi);
	if (h->kind == K_CTL) {
		int err = control(buf, size);
		return err ? err : (int)size;
	}
	if (stale(h))	/* kernel writeback of a dead machine's pages: dropped
			 * quietly, lest a later close report its error */
		return fi->writepage ? (int)size : -EIO;
	int n = cache_write(h->f, buf, size, pos);
	if (n >= 0 && h->sync) {
		int err = cache_flush(h->f);
		if (err)
			return err;
	}
	return n;
}

/* Invalidates the kernel's page cache of the page-cached files: after a
 * cut, a dirty mmap page must not reach us through a later handle. Runs
 * without big: the kernel may send writes back while it invalidates. */
static void invalidate_page_cached(void)
{
	pthread_mutex_lock(&big);
	char **paths = shm_paths;
	size_t n = nshm;
	shm_paths = NULL;
	nshm = 0;
	pthread_mutex_unlock(&big);
	for (size_t i = 0; i < n; i++) {
		fuse_invalidate_path(fuse_get_context()->fuse, paths[i]);
		free(paths[i]);
	}
	free(paths);
}

static int pfs_write(const char *path, const char *buf, size_t size, off_t pos,
		     struct fuse_file_info *fi)
{
	(void)path;
	pthread_mutex_lock(&big);
	int r = do_write(buf, size, pos, fi);
	int cut = handle_of(fi)->kind == K_CTL && off;
	pthread_mutex_unlock(&big);
	if (cut)
		invalidate_page_cached();
	return r;
}

static int do_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	if (off)
		return -EIO;
	return statvfs(root, st) < 0 ? -errno : 0;
}

static int pfs_statfs(const char *path, struct statvfs *st)
{
	LOCKED(do_statfs(path, st));
}

static int do_fsync(struct fuse_file_info *fi)
{
	struct handle *h = handle_of(fi);
	if (h->kind == K_CTL)
		return 0;
	if (stale(h))
		return -EIO;
	flushes++;
	return cache_flush(h->f);
}

static int pfs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;	/* metadata is durable at once: both flush the data */
	LOCKED(do_fsync(fi));
}

static int do_release(struct fuse_file_info *fi)
{
	struct handle *h = handle_of(fi);
	if (h->kind == K_FILE) {
		struct file *f = h->f;
		struct stat st;
		f->refs--;
		if (f->refs == 0 && fstat(f->fd, &st) == 0 && st.st_nlink == 0)
			drop_pages(f);	/* unlinked: nobody can see it again */
		forget_if_unused(f);
	}
	free(h);
	return 0;
}

static int pfs_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	LOCKED(do_release(fi));
}

static int do_opendir(const char *path, struct fuse_file_info *fi)
{
	char bp[PATH_MAX];
	int err = path_op(path, bp);
	if (err)
		return err;
	struct handle *h = calloc(1, sizeof *h);
	if (!h)
		return -ENOMEM;
	h->dir = opendir(bp);
	if (!h->dir) {
		err = -errno;
		free(h);
		return err;
	}
	h->kind = K_DIR;
	h->epoch = epoch;
	fi->fh = (uintptr_t)h;
	return 0;
}

static int pfs_opendir(const char *path, struct fuse_file_info *fi)
{
	LOCKED(do_opendir(path, fi));
}

/* Lists the whole directory at once (the high-level API's offset-less mode). */
static int do_readdir(void *buf, fuse_fill_dir_t filler, struct fuse_file_info *fi)
{
	struct handle *h = handle_of(fi);
	if (stale(h))
		return -EIO;
	rewinddir(h->dir);
	struct dirent *de;
	while ((de = readdir(h->dir))) {
		struct stat st;
		memset(&st, 0, sizeof st);
		st.st_ino = de->d_ino;
		st.st_mode = DTTOIF(de->d_type);
		if (filler(buf, de->d_name, &st, 0, 0))
			break;
	}
	return 0;
}

static int pfs_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t pos,
		       struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)path;
	(void)pos;
	(void)flags;
	LOCKED(do_readdir(buf, filler, fi));
}

static int pfs_releasedir(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	closedir(handle_of(fi)->dir);
	free(handle_of(fi));
	return 0;
}

static int pfs_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;
	LOCKED(stale(handle_of(fi)) ? -EIO : 0);
}

static void *pfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	cfg->use_ino = 1;
	cfg->hard_remove = 1;	/* no .fuse_hidden files in the backing dir */
	cfg->nullpath_ok = 1;
	cfg->entry_timeout = 0;
	cfg->attr_timeout = 0;
	cfg->negative_timeout = 0;
	cfg->kernel_cache = 0;
	cfg->auto_cache = 0;
	cfg->direct_io = 0;	/* chosen per file in attach() */
	conn->want &= ~(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS | FUSE_CAP_WRITEBACK_CACHE);
	return NULL;
}

static const struct fuse_operations ops = {
	.init = pfs_init,
	.getattr = pfs_getattr,
	.readlink = pfs_readlink,
	.mknod = pfs_mknod,
	.mkdir = pfs_mkdir,
	.unlink = pfs_unlink,
	.rmdir = pfs_rmdir,
	.symlink = pfs_symlink,
	.rename = pfs_rename,
	.link = pfs_link,
	.chmod = pfs_chmod,
	.chown = pfs_chown,
	.truncate = pfs_truncate,
	.utimens = pfs_utimens,
	.open = pfs_open,
	.create = pfs_create,
	.read = pfs_read,
	.write = pfs_write,
	.statfs = pfs_statfs,
	.fsync = pfs_fsync,
	.release = pfs_release,
	.opendir = pfs_opendir,
	.readdir = pfs_readdir,
	.releasedir = pfs_releasedir,
	.fsyncdir = pfs_fsyncdir,
};

int main(int argc, char *argv[])
{
	if (argc < 3 || argv[1][0] == '-') {
		fprintf(stderr, "usage: %s BACKING MOUNTPOINT [fuse options]\n", argv[0]);
		return 2;
	}
	if (!realpath(argv[1], root)) {
		perror(argv[1]);
		return 2;
	}
	if (strcmp(root, "/") == 0)
		root[0] = 0;
	umask(0);	/* the kernel has applied the caller's umask already */
	char **args = calloc(argc + 3, sizeof *args);
	int n = 0;
	if (!args)
		return 1;
	args[n++] = argv[0];
	args[n++] = argv[2];
	args[n++] = "-o";
	args[n++] = "allow_other,default_permissions,fsname=powerfs,subtype=powerfs";
	for (int i = 3; i < argc; i++)
		args[n++] = argv[i];
	return fuse_main(n, args, &ops, NULL);
}
