/*
 * powercut: an LD_PRELOAD shim that records, beside a process's real file
 * system, what a disk would have kept if the power went out at any moment.
 *
 * The process runs normally on the real files under POWERCUT_ROOT (that is
 * the page cache: what a killed process leaves behind). Beside it, under
 * POWERCUT_SHADOW, the shim keeps the *durable* image, under the strict POSIX
 * model:
 *
 *   - a file's data and size reach the image only when the file is fsync'd
 *     or fdatasync'd (sync_file_range does not count: it neither flushes the
 *     drive's cache nor the file's size);
 *   - a directory's entries (creations, renames, unlinks, mkdirs) reach the
 *     image only when that directory itself is fsync'd.
 *
 * Layout of the shadow:
 *   root          the object id of the root directory
 *   f/<id>        durable content of file object <id> (its length is the
 *                 durable size)
 *   d/<id>        durable listing of directory object <id>, lines of
 *                 "<f|d> <id> <name>"
 *   g/<inode>     the current generation of an inode, where it is not 0
 * An object id is "<inode>.<generation>": the generation changes when the
 * inode's last name goes away, so a reused inode number is a new object.
 *
 * At start the whole tree under the root counts as durable (the harness made
 * it so before starting the process). After the process is killed, the
 * harness (the bridgekeys-powercut crate) rebuilds the tree a disk would show
 * from this image (strict model), or from the live tree and the image (torn
 * model: metadata as at the cut, unsynced data blocks partly lost).
 *
 * Test tool only: never load it into a production process.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_FD 65536
#define MAX_OBJ 16384

struct obj {
    uint64_t ino;
    uint32_t gen;
    uint8_t *dirty; /* one byte per block: written since the last sync */
    size_t dirty_len;
    /* Held from the capture before a sync to its recording after it, so the
     * syncs of one object are recorded in order. Taken before `lock`. */
    pthread_mutex_t sync_lock;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int enabled;
/* Test only (POWERCUT_KILL_IN_RETIRE set): die by SIGKILL in the middle of
 * the first generation update, as a random kill can. */
static int kill_in_retire;
static char root[PATH_MAX];
static size_t root_len;
static char shadow[PATH_MAX];
static struct obj objs[MAX_OBJ];
static int nobjs;
static int fd_obj[MAX_FD]; /* object index + 1; 0 = not under the root */
static uint32_t fd_gen[MAX_FD]; /* the object's generation when the fd was opened */

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_creat)(const char *, mode_t);
static int (*real_creat64)(const char *, mode_t);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_close)(int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_rmdir)(const char *);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);

static void die(const char *what) {
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "powercut shim: %s: %s\n", what, strerror(errno));
    if (n > 0 && real_write) {
        (void)!real_write(2, msg, (size_t)n);
    }
    abort();
}

static void *must_sym(const char *name) {
    void *p = dlsym(RTLD_NEXT, name);
    if (!p) {
        errno = ENOSYS;
        die(name);
    }
    return p;
}

static void shadow_path(char *out, size_t n, const char *kind, const char *id);
static void write_all(int fd, const void *buf, size_t len, off_t off);

/* ---- objects --------------------------------------------------------- */

static int obj_for_ino(uint64_t ino) {
    for (int i = nobjs - 1; i >= 0; i--) {
        if (objs[i].ino == ino) return i;
    }
    if (nobjs == MAX_OBJ) {
        errno = ENOSPC;
        die("too many objects");
    }
    objs[nobjs].ino = ino;
    objs[nobjs].gen = 0;
    objs[nobjs].dirty = NULL;
    objs[nobjs].dirty_len = 0;
    pthread_mutex_init(&objs[nobjs].sync_lock, NULL);
    return nobjs++;
}

static void obj_id(int o, char *out, size_t n) {
    snprintf(out, n, "%llu.%u", (unsigned long long)objs[o].ino, objs[o].gen);
}

static void mark_dirty(int o, uint64_t off, uint64_t len) {
    if (len == 0) return;
    size_t first = off / BLOCK, last = (off + len - 1) / BLOCK;
    struct obj *b = &objs[o];
    if (last >= b->dirty_len) {
        size_t want = b->dirty_len ? b->dirty_len : 64;
        while (want <= last) want *= 2;
        uint8_t *d = realloc(b->dirty, want);
        if (!d) die("realloc");
        memset(d + b->dirty_len, 0, want - b->dirty_len);
        b->dirty = d;
        b->dirty_len = want;
    }
    memset(b->dirty + first, 1, last - first + 1);
}

/* Is `fd` open on something under the root? Records it if so. */
static void track_fd(int fd) {
    if (fd < 0 || fd >= MAX_FD) return;
    fd_obj[fd] = 0;
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return;
    target[n] = 0;
    if ((size_t)n < root_len || memcmp(target, root, root_len) != 0) return;
    if ((size_t)n != root_len && target[root_len] != '/') return;
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) return;
    int o = obj_for_ino((uint64_t)st.st_ino);
    fd_obj[fd] = o + 1;
    fd_gen[fd] = objs[o].gen;
}

static int tracked(int fd) {
    return enabled && fd >= 0 && fd < MAX_FD && fd_obj[fd] != 0;
}

/* The name at `dirfd`/`path` is about to go away (unlink, rmdir, or replaced
 * by a rename). If it is a file's last link or a directory, its inode will be
 * a new object when reused: returns the inode to retire once the call
 * succeeded, or 0. */
static uint64_t to_retire(int dirfd, const char *path) {
    struct stat st;
    if (fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) != 0) return 0;
    if (S_ISREG(st.st_mode) && st.st_nlink == 1) return (uint64_t)st.st_ino;
    if (S_ISDIR(st.st_mode)) return (uint64_t)st.st_ino;
    return 0;
}

static void retire(uint64_t ino) {
    if (ino == 0) return;
    pthread_mutex_lock(&lock);
    for (int i = nobjs - 1; i >= 0; i--) {
        if (objs[i].ino == ino) {
            objs[i].gen++;
            free(objs[i].dirty);
            objs[i].dirty = NULL;
            objs[i].dirty_len = 0;
            /* g/<inode> tells the harness which generation is current.
             * Written beside g/ and renamed over it, so a kill in the middle
             * leaves the old generation or the new one, never an empty file
             * (the process is killed at random moments, start-up included,
             * when sled renames and removes files). The old generation left
             * by a kill before the rename is a legal outcome of a power cut:
             * the unlink or rename that retired it was not made durable. */
            char name[64], path_g[PATH_MAX], tmp[PATH_MAX];
            snprintf(name, sizeof name, "%llu", (unsigned long long)ino);
            shadow_path(path_g, sizeof path_g, "g", name);
            snprintf(tmp, sizeof tmp, "%s/g.tmp", shadow);
            int g = real_open64(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
            if (g < 0) die(tmp);
            snprintf(name, sizeof name, "%u", objs[i].gen);
            write_all(g, name, strlen(name), 0);
            real_close(g);
            if (kill_in_retire) raise(SIGKILL);
            if (real_rename(tmp, path_g) != 0) die("rename generation");
            break;
        }
    }
    /* Not found: never seen in this run, not even in the initial walk, so
     * not under the root. */
    pthread_mutex_unlock(&lock);
}

/* ---- the durable image ------------------------------------------------ */

static void shadow_path(char *out, size_t n, const char *kind, const char *id) {
    snprintf(out, n, "%s/%s/%s", shadow, kind, id);
}

static void write_all(int fd, const void *buf, size_t len, off_t off) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = real_pwrite64(fd, p, len, off);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("write to shadow");
        }
        p += w;
        len -= (size_t)w;
        off += w;
    }
}

/* Copy the whole content of file object `o` from `src` (an fd readable on
 * the live file, `size` bytes) into its durable image. */
static void persist_file(int o, int src, off_t size) {
    char id[64], path[PATH_MAX];
    obj_id(o, id, sizeof id);
    shadow_path(path, sizeof path, "f", id);
    int dst = real_open64(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (dst < 0) die(path);
    if (real_ftruncate64(dst, size) != 0) die("truncate shadow");
    static char buf[BLOCK];
    size_t blocks = ((size_t)size + BLOCK - 1) / BLOCK;
    for (size_t b = 0; b < blocks; b++) {
        off_t off = (off_t)(b * BLOCK);
        ssize_t r = pread(src, buf, BLOCK, off);
        if (r < 0) die("read live file");
        if (r > 0) write_all(dst, buf, (size_t)r, off);
    }
    if (objs[o].dirty) memset(objs[o].dirty, 0, objs[o].dirty_len);
    real_close(dst);
}

/* The entries of the directory open at `dir`, as the lines of a durable
 * listing, in a malloc'd buffer. Call with `lock` held. */
static char *build_listing(int dir, size_t *len) {
    int dup_fd = real_openat64(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dup_fd < 0) die("reopen directory");
    DIR *d = fdopendir(dup_fd);
    if (!d) die("fdopendir");
    size_t cap = 4096, at = 0;
    char *buf = malloc(cap);
    if (!buf) die("malloc");
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        char kind;
        if (S_ISREG(st.st_mode)) kind = 'f';
        else if (S_ISDIR(st.st_mode)) kind = 'd';
        else continue;
        int child = obj_for_ino((uint64_t)st.st_ino);
        char cid[64], line[PATH_MAX + 96];
        obj_id(child, cid, sizeof cid);
        int n = snprintf(line, sizeof line, "%c %s %s\n", kind, cid, e->d_name);
        if (n <= 0) continue;
        while (at + (size_t)n > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf) die("realloc");
        }
        memcpy(buf + at, line, (size_t)n);
        at += (size_t)n;
    }
    closedir(d);
    *len = at;
    return buf;
}

/* Record `listing` as the durable entries of directory object `id`. */
static void write_listing(const char *id, const char *listing, size_t len) {
    char path[PATH_MAX], tmp[PATH_MAX];
    shadow_path(path, sizeof path, "d", id);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int out = real_open64(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out < 0) die(tmp);
    write_all(out, listing, len, 0);
    real_close(out);
    /* Atomic against a kill in the middle: the old listing or the new one. */
    if (real_rename(tmp, path) != 0) die("rename listing");
}

/* Record the current entries of the directory open at `dir` as durable. */
static void persist_dir(int o, int dir) {
    char id[64];
    obj_id(o, id, sizeof id);
    size_t len;
    char *listing = build_listing(dir, &len);
    write_listing(id, listing, len);
    free(listing);
}

/* The initial image: everything under the root is durable at start. */
static void snapshot_tree(const char *dir_path) {
    int dir = real_open64(dir_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dir < 0) die(dir_path);
    struct stat st;
    if (fstat(dir, &st) != 0) die("stat");
    int o = obj_for_ino((uint64_t)st.st_ino);
    persist_dir(o, dir);
    DIR *d = fdopendir(dir);
    if (!d) die("fdopendir");
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char child[PATH_MAX];
        snprintf(child, sizeof child, "%s/%s", dir_path, e->d_name);
        struct stat cst;
        if (lstat(child, &cst) != 0) continue;
        if (S_ISDIR(cst.st_mode)) {
            snapshot_tree(child);
        } else if (S_ISREG(cst.st_mode)) {
            int f = real_open64(child, O_RDONLY | O_CLOEXEC, 0);
            if (f < 0) die(child);
            persist_file(obj_for_ino((uint64_t)cst.st_ino), f, cst.st_size);
            real_close(f);
        }
    }
    closedir(d);
}

__attribute__((constructor)) static void powercut_init(void) {
    real_open = must_sym("open");
    real_open64 = must_sym("open64");
    real_openat = must_sym("openat");
    real_openat64 = must_sym("openat64");
    real_creat = must_sym("creat");
    real_creat64 = must_sym("creat64");
    real_write = must_sym("write");
    real_pwrite = must_sym("pwrite");
    real_pwrite64 = must_sym("pwrite64");
    real_writev = must_sym("writev");
    real_pwritev = must_sym("pwritev");
    real_pwritev64 = must_sym("pwritev64");
    real_ftruncate = must_sym("ftruncate");
    real_ftruncate64 = must_sym("ftruncate64");
    real_fallocate = must_sym("fallocate");
    real_fallocate64 = must_sym("fallocate64");
    real_fsync = must_sym("fsync");
    real_fdatasync = must_sym("fdatasync");
    real_close = must_sym("close");
    real_unlink = must_sym("unlink");
    real_unlinkat = must_sym("unlinkat");
    real_rmdir = must_sym("rmdir");
    real_rename = must_sym("rename");
    real_renameat = must_sym("renameat");
    real_renameat2 = must_sym("renameat2");
    real_dup = must_sym("dup");
    real_dup2 = must_sym("dup2");
    real_dup3 = must_sym("dup3");
    real_fcntl = must_sym("fcntl");

    kill_in_retire = getenv("POWERCUT_KILL_IN_RETIRE") != NULL;
    const char *r = getenv("POWERCUT_ROOT");
    const char *s = getenv("POWERCUT_SHADOW");
    if (!r || !s) return;
    if (!realpath(r, root)) die("POWERCUT_ROOT");
    snprintf(shadow, sizeof shadow, "%s", s);
    root_len = strlen(root);

    /* One process is modelled per image. Its pid is recorded: the same pid
     * again is that process after an exec (a wrapper script, say), which
     * goes on with the image as it is; any other process that inherited the
     * environment is not modelled (it must not take the tree as durable
     * again over the same image). */
    char pid_path[PATH_MAX];
    snprintf(pid_path, sizeof pid_path, "%s/pid", shadow);
    long owner = 0;
    FILE *pf = fopen(pid_path, "r");
    if (pf) {
        if (fscanf(pf, "%ld", &owner) != 1) owner = 0;
        fclose(pf);
    }
    if (owner != 0 && owner != (long)getpid()) return;
    if (owner == (long)getpid()) {
        /* After an exec: the memory of the process before it is gone, but
         * the image names every object it knows ("<inode>.<generation>" in
         * f/ and d/, the current generation in g/). Reload them, so that an
         * unlink still retires a known inode. */
        const char *kinds[] = {"f", "d"};
        for (int k = 0; k < 2; k++) {
            char kdir[PATH_MAX];
            snprintf(kdir, sizeof kdir, "%s/%s", shadow, kinds[k]);
            DIR *d = opendir(kdir);
            if (!d) continue;
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                unsigned long long ino;
                unsigned gen;
                if (sscanf(e->d_name, "%llu.%u", &ino, &gen) != 2) continue;
                int o = obj_for_ino((uint64_t)ino);
                if (gen > objs[o].gen) objs[o].gen = gen;
            }
            closedir(d);
        }
        char gdir[PATH_MAX];
        snprintf(gdir, sizeof gdir, "%s/g", shadow);
        DIR *d = opendir(gdir);
        if (d) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.') continue;
                char gpath[PATH_MAX];
                snprintf(gpath, sizeof gpath, "%s/%s", gdir, e->d_name);
                FILE *gf = fopen(gpath, "r");
                unsigned gen = 0;
                if (gf) {
                    if (fscanf(gf, "%u", &gen) != 1) gen = 0;
                    fclose(gf);
                }
                int o = obj_for_ino(strtoull(e->d_name, NULL, 10));
                objs[o].gen = gen;
            }
            closedir(d);
        }
        enabled = 1;
        return;
    }
    char text[32];
    int tn = snprintf(text, sizeof text, "%ld\n", (long)getpid());
    int pfd = real_open64(pid_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (pfd < 0) return; /* another process got there first */
    write_all(pfd, text, (size_t)tn, 0);
    real_close(pfd);

    char sub[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/f", shadow);
    if (mkdir(sub, 0700) != 0 && errno != EEXIST) die(sub);
    snprintf(sub, sizeof sub, "%s/d", shadow);
    if (mkdir(sub, 0700) != 0 && errno != EEXIST) die(sub);
    snprintf(sub, sizeof sub, "%s/g", shadow);
    if (mkdir(sub, 0700) != 0 && errno != EEXIST) die(sub);

    snapshot_tree(root);
    struct stat st;
    if (stat(root, &st) != 0) die("stat root");
    char id[64];
    obj_id(obj_for_ino((uint64_t)st.st_ino), id, sizeof id);
    /* Written aside and renamed: a kill in the middle of start-up leaves
     * either no `root` (the program's code never ran) or a whole one. */
    snprintf(sub, sizeof sub, "%s/root.tmp", shadow);
    int f = real_open64(sub, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (f < 0) die(sub);
    write_all(f, id, strlen(id), 0);
    real_close(f);
    char root_file[PATH_MAX];
    snprintf(root_file, sizeof root_file, "%s/root", shadow);
    if (real_rename(sub, root_file) != 0) die("rename root");
    enabled = 1;
}

/* ---- interposed calls ------------------------------------------------- */

static mode_t mode_arg(int flags, va_list ap) {
    if (flags & (O_CREAT | __O_TMPFILE)) return (mode_t)va_arg(ap, int);
    return 0;
}

/* A truncating open zeroes the old contents: those blocks are dirty. */
static off_t size_before_trunc(int dirfd, const char *path, int flags) {
    struct stat st;
    if (!enabled || !(flags & O_TRUNC)) return 0;
    if (fstatat(dirfd, path, &st, 0) != 0 || !S_ISREG(st.st_mode)) return 0;
    return st.st_size;
}

static int after_open(int fd, off_t truncated) {
    if (fd >= 0 && enabled) {
        int saved = errno;
        pthread_mutex_lock(&lock);
        track_fd(fd);
        if (truncated > 0 && fd < MAX_FD && fd_obj[fd] && fd_gen[fd] == objs[fd_obj[fd] - 1].gen) {
            mark_dirty(fd_obj[fd] - 1, 0, (uint64_t)truncated);
        }
        pthread_mutex_unlock(&lock);
        errno = saved;
    }
    return fd;
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    off_t t = size_before_trunc(AT_FDCWD, path, flags);
    return after_open(real_open(path, flags, mode), t);
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    off_t t = size_before_trunc(AT_FDCWD, path, flags);
    return after_open(real_open64(path, flags, mode), t);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    off_t t = size_before_trunc(dirfd, path, flags);
    return after_open(real_openat(dirfd, path, flags, mode), t);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    off_t t = size_before_trunc(dirfd, path, flags);
    return after_open(real_openat64(dirfd, path, flags, mode), t);
}

int creat(const char *path, mode_t mode) {
    off_t t = size_before_trunc(AT_FDCWD, path, O_TRUNC);
    return after_open(real_creat(path, mode), t);
}

int creat64(const char *path, mode_t mode) {
    off_t t = size_before_trunc(AT_FDCWD, path, O_TRUNC);
    return after_open(real_creat64(path, mode), t);
}

static void wrote(int fd, off_t off, ssize_t n) {
    if (n <= 0 || !tracked(fd)) return;
    pthread_mutex_lock(&lock);
    int o = fd_obj[fd] - 1;
    /* A write through an fd whose file lost its last name reaches nothing
     * a listing can name. */
    if (o >= 0 && fd_gen[fd] == objs[o].gen) mark_dirty(o, (uint64_t)off, (uint64_t)n);
    pthread_mutex_unlock(&lock);
}

ssize_t write(int fd, const void *buf, size_t len) {
    ssize_t n = real_write(fd, buf, len);
    if (n > 0 && tracked(fd)) {
        int saved = errno;
        off_t end = lseek(fd, 0, SEEK_CUR);
        if (end >= n) wrote(fd, end - n, n);
        errno = saved;
    }
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    ssize_t n = real_writev(fd, iov, cnt);
    if (n > 0 && tracked(fd)) {
        int saved = errno;
        off_t end = lseek(fd, 0, SEEK_CUR);
        if (end >= n) wrote(fd, end - n, n);
        errno = saved;
    }
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    ssize_t n = real_pwrite(fd, buf, len, off);
    wrote(fd, off, n);
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off) {
    ssize_t n = real_pwrite64(fd, buf, len, off);
    wrote(fd, off, n);
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    ssize_t n = real_pwritev(fd, iov, cnt, off);
    wrote(fd, off, n);
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    ssize_t n = real_pwritev64(fd, iov, cnt, off);
    wrote(fd, off, n);
    return n;
}

/* A size change dirties every block between the old and the new end. */
static int resized(int fd, off_t len, int (*call)(int, off_t)) {
    struct stat st;
    int have = tracked(fd) && fstat(fd, &st) == 0;
    int r = call(fd, len);
    if (r == 0 && have) {
        off_t lo = st.st_size < len ? st.st_size : len;
        off_t hi = st.st_size < len ? len : st.st_size;
        wrote(fd, lo, hi - lo);
    }
    return r;
}

int ftruncate(int fd, off_t len) { return resized(fd, len, real_ftruncate); }
int ftruncate64(int fd, off_t len) { return resized(fd, len, real_ftruncate64); }

int fallocate(int fd, int mode, off_t off, off_t len) {
    int r = real_fallocate(fd, mode, off, len);
    if (r == 0) wrote(fd, off, len);
    return r;
}

int fallocate64(int fd, int mode, off_t off, off_t len) {
    int r = real_fallocate64(fd, mode, off, len);
    if (r == 0) wrote(fd, off, len);
    return r;
}

/* What a sync is about to make durable, taken *before* the real call: only
 * what the process wrote before asking is promised by it. Whatever is written
 * while the sync runs stays dirty for the next one. */
struct capture {
    int o;
    uint32_t gen;
    int is_dir;
    off_t size;
    size_t n;       /* blocks captured */
    size_t *blocks; /* their numbers */
    char *data;     /* n * BLOCK bytes */
    char *listing;  /* directories: the listing */
    size_t listing_len;
};

/* Take the capture for a sync of `fd`; holds the object's sync lock until
 * `record` is called. Returns 0 if there is nothing to model. */
static int capture(int fd, struct capture *c) {
    if (!tracked(fd)) return 0;
    int saved = errno;
    memset(c, 0, sizeof *c);
    int o = fd_obj[fd] - 1;
    if (o < 0) return 0;
    pthread_mutex_lock(&objs[o].sync_lock);
    pthread_mutex_lock(&lock);
    struct stat st;
    if (fstat(fd, &st) != 0) die("stat synced fd");
    c->o = o;
    c->gen = fd_gen[fd];
    if (c->gen != objs[o].gen) {
        /* The fd's file lost its last name: no listing can reach it. */
        pthread_mutex_unlock(&lock);
        pthread_mutex_unlock(&objs[o].sync_lock);
        errno = saved;
        return 0;
    }
    c->is_dir = S_ISDIR(st.st_mode);
    c->size = st.st_size;
    if (c->is_dir) {
        c->listing = build_listing(fd, &c->listing_len);
        pthread_mutex_unlock(&lock);
        errno = saved;
        return 1;
    }
    size_t blocks = ((size_t)st.st_size + BLOCK - 1) / BLOCK;
    size_t limit = blocks < objs[o].dirty_len ? blocks : objs[o].dirty_len;
    for (size_t b = 0; b < limit; b++) c->n += objs[o].dirty[b] ? 1 : 0;
    c->blocks = malloc((c->n ? c->n : 1) * sizeof *c->blocks);
    if (!c->blocks) die("malloc");
    size_t k = 0;
    for (size_t b = 0; b < limit; b++) {
        if (objs[o].dirty[b]) {
            c->blocks[k++] = b;
            objs[o].dirty[b] = 0;
        }
    }
    /* Blocks past the end are gone with the size; clear their marks too. */
    for (size_t b = limit; b < objs[o].dirty_len; b++) objs[o].dirty[b] = 0;
    pthread_mutex_unlock(&lock);
    /* Read the captured blocks now, before the real sync: they hold at least
     * what was written before it was asked for. */
    c->data = malloc((c->n ? c->n : 1) * BLOCK);
    if (!c->data) die("malloc");
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    int src = real_open64(link, O_RDONLY | O_CLOEXEC, 0);
    if (src < 0) die("reopen synced file");
    for (size_t i = 0; i < c->n; i++) {
        memset(c->data + i * BLOCK, 0, BLOCK);
        if (pread(src, c->data + i * BLOCK, BLOCK, (off_t)(c->blocks[i] * BLOCK)) < 0) {
            die("read live file");
        }
    }
    real_close(src);
    errno = saved;
    return 1;
}

/* After the real sync: record the capture as durable if it succeeded (else
 * its blocks are dirty again), then let the next sync of the object go. */
static void record(struct capture *c, int ok) {
    int saved = errno;
    int o = c->o;
    pthread_mutex_lock(&lock);
    if (ok && c->gen == objs[o].gen) {
        char id[64];
        obj_id(o, id, sizeof id);
        if (c->is_dir) {
            write_listing(id, c->listing, c->listing_len);
        } else {
            char path[PATH_MAX];
            shadow_path(path, sizeof path, "f", id);
            int dst = real_open64(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
            if (dst < 0) die(path);
            if (real_ftruncate64(dst, c->size) != 0) die("truncate shadow");
            for (size_t i = 0; i < c->n; i++) {
                off_t off = (off_t)(c->blocks[i] * BLOCK);
                if (off >= c->size) continue;
                size_t len = (size_t)(c->size - off) < BLOCK ? (size_t)(c->size - off) : BLOCK;
                write_all(dst, c->data + i * BLOCK, len, off);
            }
            real_close(dst);
        }
    } else if (!ok && !c->is_dir && c->gen == objs[o].gen) {
        for (size_t i = 0; i < c->n; i++) mark_dirty(o, c->blocks[i] * BLOCK, 1);
    }
    pthread_mutex_unlock(&lock);
    pthread_mutex_unlock(&objs[o].sync_lock);
    free(c->blocks);
    free(c->data);
    free(c->listing);
    errno = saved;
}

/* A real sync of `fd` between its capture and its recording. */
static int modelled_sync(int fd, int (*call)(int)) {
    struct capture c;
    int have = capture(fd, &c);
    int r = call(fd);
    if (have) record(&c, r == 0);
    return r;
}

int fsync(int fd) { return modelled_sync(fd, real_fsync); }
int fdatasync(int fd) { return modelled_sync(fd, real_fdatasync); }

int close(int fd) {
    if (enabled && fd >= 0 && fd < MAX_FD) fd_obj[fd] = 0;
    return real_close(fd);
}

static int dup_of(int old, int fd) {
    if (fd >= 0 && fd < MAX_FD && enabled) {
        fd_obj[fd] = (old >= 0 && old < MAX_FD) ? fd_obj[old] : 0;
        fd_gen[fd] = (old >= 0 && old < MAX_FD) ? fd_gen[old] : 0;
    }
    return fd;
}

int dup(int old) { return dup_of(old, real_dup(old)); }
int dup2(int old, int fd) { return dup_of(old, real_dup2(old, fd)); }
int dup3(int old, int fd, int flags) { return dup_of(old, real_dup3(old, fd, flags)); }

int fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    /* Every fcntl command takes at most one argument, an int or a pointer. */
    void *arg = va_arg(ap, void *);
    va_end(ap);
    int r = real_fcntl(fd, cmd, arg);
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) dup_of(fd, r);
    return r;
}

int unlink(const char *path) {
    uint64_t ino = enabled ? to_retire(AT_FDCWD, path) : 0;
    int r = real_unlink(path);
    if (r == 0) retire(ino);
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    uint64_t ino = enabled ? to_retire(dirfd, path) : 0;
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0) retire(ino);
    return r;
}

int rmdir(const char *path) {
    uint64_t ino = enabled ? to_retire(AT_FDCWD, path) : 0;
    int r = real_rmdir(path);
    if (r == 0) retire(ino);
    return r;
}

int rename(const char *from, const char *to) {
    uint64_t ino = enabled ? to_retire(AT_FDCWD, to) : 0;
    int r = real_rename(from, to);
    if (r == 0) retire(ino);
    return r;
}

int renameat(int fromfd, const char *from, int tofd, const char *to) {
    uint64_t ino = enabled ? to_retire(tofd, to) : 0;
    int r = real_renameat(fromfd, from, tofd, to);
    if (r == 0) retire(ino);
    return r;
}

int renameat2(int fromfd, const char *from, int tofd, const char *to, unsigned int flags) {
    uint64_t ino = (enabled && !(flags & RENAME_EXCHANGE)) ? to_retire(tofd, to) : 0;
    int r = real_renameat2(fromfd, from, tofd, to, flags);
    if (r == 0) retire(ino);
    return r;
}
