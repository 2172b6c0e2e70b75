/* The blob store's file write without the GIL: bastion.blobs.filesystem.FileWriter writes an object that is
 * made durable on its own (128 KB to 8 MB: CT, MR, small multi-frame) from one of its commit threads while the
 * ingest pipeline runs the object's index statements. In Python the commit thread needs the GIL back after every
 * system call and for the copy into its aligned buffer, and waits for it while other threads run Python code;
 * these threads never take it (see BENCHMARKS.md, "_cwrite").
 *
 * create_file(path, data, sync, sync_dir, direct) creates ``path`` (it must not exist) holding ``data``. With
 * ``direct``, the whole pages go to the disk with O_DIRECT from a buffer this thread keeps (no page cache) and
 * the last partial page goes through the page cache; where the filesystem refuses O_DIRECT all of it does.
 * With ``sync`` the file is fdatasync'd, with ``sync_dir`` its directory fsync'd as well. On failure it
 * removes the file it created and raises OSError (FileExistsError if ``path`` existed, untouched).
 *
 * submit(path, data, sync, sync_dir, direct) does what create_file does, in threads of this
 * module's own that never take the GIL, and returns at once with a Pending whose wait() returns when the file is
 * written (raising the OSError create_file would have). Without sync it goes to the ORDERED queue (one thread, in
 * order): a journaled object (under 128 KB) is durable once its journal record is, its file only has to exist
 * before the store answers, and creating a file costs kernel time (the filesystem's inode allocation), which
 * runs in this thread while the caller's thread runs its index statements. With sync (objects from 128
 * KB) it goes to the DURABLE queue (up to four threads; the file's directory is fsync'd by the DIRSYNC thread
 * meanwhile). Where the threads run is the kernel's choice: nothing here places them on CPUs.
 * The data is copied (page-aligned, so O_DIRECT writes it as it is), and the caller's buffer is free at once;
 * a Buffer (this module's type, in which the blob store collects an object) is not copied: the job shares its
 * memory, which is page-aligned already, and submit() freezes the Buffer: from then on it can be read but never
 * written (extend, +=, __init__ raise BufferError; its buffer protocol was read-only from the start), so the
 * bytes a writer thread reads are the bytes that were submitted. Both come from a pool of reused buffers
 * (take_buffer, give_buffer).
 *
 * barrier() returns once every file submitted before the call is written (or failed): the journal's checkpoint
 * calls it before its syncfs, which must cover the files of the records it is about to void.
 *
 * submit_sync(fd) queues an fdatasync of the journal's segment (submitted once the record is written): after
 * the file in the same thread, or with parallel=True in a thread for durable files, so that the disk's flush
 * starts at once (for a caller that waits: one wake-up more, but the flush overlaps its index statements).
 *
 * An event loop that must not wait for a job submits it with notify=True and watches notify_fd(), the read
 * end of a pipe that gets a byte whenever such a job finishes; it then finds the job done() and goes on. No
 * Python thread is woken (no GIL to hand over and back).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096

static __thread unsigned char *aligned_buf = NULL; /* each commit thread's O_DIRECT buffer, reused */
static __thread size_t aligned_size = 0;

static int write_all(int fd, const unsigned char *p, size_t n, off_t at) {
    while (n > 0) {
        ssize_t done = pwrite(fd, p, n, at);
        if (done < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (done == 0) {
            errno = EIO;
            return -1;
        }
        p += done;
        n -= (size_t)done;
        at += done;
    }
    return 0;
}

/* Whole pages with O_DIRECT, the rest buffered; 1 if the filesystem refused O_DIRECT (nothing written). */
static int write_direct(int fd, const unsigned char *data, size_t size) {
    size_t whole = size - size % PAGE;
    if (whole == 0) return 1;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    if (fcntl(fd, F_SETFL, flags | O_DIRECT) < 0) return errno == EINVAL ? 1 : -1;
    const unsigned char *source = data; /* a writer thread's own copy is page-aligned already */
    if (((uintptr_t)data & (PAGE - 1)) != 0) {
        if (aligned_size < whole) {
            size_t want = whole < ((size_t)1 << 20) ? ((size_t)1 << 20) : whole;
            void *p = NULL;
            if (posix_memalign(&p, PAGE, want) != 0) {
                errno = ENOMEM;
                return -1;
            }
            free(aligned_buf);
            aligned_buf = p;
            aligned_size = want;
        }
        memcpy(aligned_buf, data, whole);
        source = aligned_buf;
    }
    if (write_all(fd, source, whole, 0) < 0) return -1;
    if (fcntl(fd, F_SETFL, flags) < 0) return -1;
    return write_all(fd, data + whole, size - whole, (off_t)whole);
}

static int sync_parent(const char *path) {
    char *copy = strdup(path);
    if (copy == NULL) {
        errno = ENOMEM;
        return -1;
    }
    int dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    if (dfd < 0) return -1;
    int rc = fsync(dfd);
    int saved = errno;
    close(dfd);
    errno = saved;
    return rc;
}

/* create_file's work, without the GIL: 0 or an errno; a file this call created is removed again on failure. */
/* Write ``bytes`` into the new, empty file ``fd`` (flushed if ``sync``) and close it: 0 or an errno. */
static int fill_file(int fd, const unsigned char *bytes, size_t size, int sync, int direct) {
    int err = 0;
    int rc = direct ? write_direct(fd, bytes, size) : 1;
    if (rc == 1) rc = write_all(fd, bytes, size, 0);
    if (rc == 0 && sync) rc = fdatasync(fd);
    if (rc != 0) err = errno;
    if (close(fd) < 0 && err == 0) err = errno;
    return err;
}

static int write_file(const char *path, const unsigned char *bytes, size_t size, int sync, int sync_dir,
                      int direct) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return errno;
    int err = fill_file(fd, bytes, size, sync, direct);
    if (err == 0 && sync_dir && sync_parent(path) < 0) err = errno;
    if (err != 0) unlink(path); /* nothing of a failed write is left behind */
    return err;
}

static PyObject *create_file(PyObject *self, PyObject *args) {
    PyObject *path_arg, *path_obj;
    Py_buffer data;
    int sync, sync_dir, direct;
    if (!PyArg_ParseTuple(args, "Oy*ppp", &path_arg, &data, &sync, &sync_dir, &direct)) return NULL;
    if (!PyUnicode_FSConverter(path_arg, &path_obj)) {
        PyBuffer_Release(&data);
        return NULL;
    }
    const char *path = PyBytes_AS_STRING(path_obj);
    const unsigned char *bytes = data.buf;
    size_t size = (size_t)data.len;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = write_file(path, bytes, size, sync, sync_dir, direct);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (err != 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_arg);
        Py_DECREF(path_obj);
        return NULL;
    }
    Py_DECREF(path_obj);
    Py_RETURN_NONE;
}


/* -- the writer threads ------------------------------------------------------------------------------------ */

typedef struct job {
    struct job *next;
    char *path;          /* the file to create; NULL: fdatasync(sync_fd) instead */
    struct block *blk;   /* the data's memory: a reference the thread drops once the file is written */
    unsigned char *data; /* blk's, page-aligned */
    size_t size;
    int sync_fd;
    int sync, sync_dir, direct; /* as create_file's */
    int parallel;             /* a flush that may overlap the ORDERED queue's jobs */
    int notify;               /* write a byte to the notify pipe when done */
    int dir_sync;             /* path is a directory to fsync (DIRSYNC; a file job's, which frees it) */
    int done, err, orphan; /* orphan: its Pending is gone, the thread frees it */
} job;

/* Three queues: ORDERED, one thread that runs its jobs in the order submitted (journaled objects' files and the
 * journal's flushes; barrier() counts them), DURABLE, up to DURABLE_THREADS threads for files flushed on their
 * own (from 128 KB), whose flushes overlap, and DIRSYNC, one thread that fsyncs those files' directories while
 * their data is written and flushed (the two flushes of the disk's cache overlap instead of following each
 * other), once for all the jobs of a directory queued together. A DIRSYNC job waits for nothing, so the DURABLE
 * threads waiting for them cannot deadlock. */
enum { ORDERED = 0, DURABLE = 1, DIRSYNC = 2, POOLS = 3 };
#define DURABLE_THREADS 4

static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_work[POOLS] = {PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
                                       PTHREAD_COND_INITIALIZER}; /* jobs queued */
static pthread_cond_t q_done = PTHREAD_COND_INITIALIZER; /* a job finished */
static job *q_head[POOLS] = {NULL, NULL, NULL}, *q_tail[POOLS] = {NULL, NULL, NULL};
static uint64_t q_submitted = 0, q_completed = 0; /* of ORDERED */
static uint64_t q_inflight = 0; /* jobs of either queue not finished yet */
static int q_threads[POOLS] = {0, 0, 0}; /* this process's threads */
static int q_idle[POOLS] = {0, 0, 0};    /* of them, waiting for work */
static uint64_t q_generation = 0; /* bumped in a forked child: the parent's jobs are not this process's */

/* The copies of submitted objects, reused. A fresh buffer of that size comes from mmap (malloc's choice): the
 * copy into it faults in and zeroes every page, and the thread's free() unmaps them again, with a TLB shootdown
 * on the other CPUs; a buffer used before costs only the copy (see BENCHMARKS.md, "_cwrite"). Buffers from
 * SPARE_MIN are kept, up to SPARE_BYTES in all. */
#define SPARE_MIN ((size_t)64 << 10)
#define SPARE_BYTES ((size_t)16 << 20)
#define SPARES 16
static pthread_mutex_t spare_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char *spare_buf[SPARES];
static size_t spare_cap[SPARES];
static int spare_count = 0;
static size_t spare_total = 0;

/* A page-aligned buffer of at least ``size`` bytes, its capacity in ``*cap``; NULL if out of memory. */
static unsigned char *take_buffer(size_t size, size_t *cap) {
    if (size >= SPARE_MIN) {
        pthread_mutex_lock(&spare_lock);
        int best = -1;
        for (int i = 0; i < spare_count; i++) /* the smallest that fits, and not one far too large */
            if (spare_cap[i] >= size && spare_cap[i] / 4 <= size && (best < 0 || spare_cap[i] < spare_cap[best]))
                best = i;
        if (best >= 0) {
            unsigned char *buf = spare_buf[best];
            *cap = spare_cap[best];
            spare_total -= *cap;
            spare_count--;
            spare_buf[best] = spare_buf[spare_count];
            spare_cap[best] = spare_cap[spare_count];
            pthread_mutex_unlock(&spare_lock);
            return buf;
        }
        pthread_mutex_unlock(&spare_lock);
    }
    size_t want = size >= SPARE_MIN ? (size + SPARE_MIN - 1) / SPARE_MIN * SPARE_MIN : (size > 0 ? size : 1);
    void *p = NULL;
    if (posix_memalign(&p, PAGE, want) != 0) return NULL;
    *cap = want;
    return p;
}

/* Keep ``buf`` for a later take_buffer, or free it. */
static void give_buffer(unsigned char *buf, size_t cap) {
    if (buf == NULL) return;
    if (cap >= SPARE_MIN) {
        pthread_mutex_lock(&spare_lock);
        if (spare_count < SPARES && spare_total + cap <= SPARE_BYTES) {
            spare_buf[spare_count] = buf;
            spare_cap[spare_count++] = cap;
            spare_total += cap;
            buf = NULL;
        }
        pthread_mutex_unlock(&spare_lock);
    }
    free(buf);
}

/* Page-aligned memory shared by a Buffer (below) and the jobs that write it: the last one to let go gives it
 * back (give_buffer), from whichever thread. */
typedef struct block {
    unsigned char *data;
    size_t cap;
    int refs;
} block;

static block *block_new(size_t size) {
    block *b = malloc(sizeof(block));
    if (b == NULL) return NULL;
    b->data = take_buffer(size, &b->cap);
    if (b->data == NULL) {
        free(b);
        return NULL;
    }
    b->refs = 1;
    return b;
}

static void block_release(block *b) {
    if (b != NULL && __atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        give_buffer(b->data, b->cap);
        free(b);
    }
}

static void free_job(job *j) {
    free(j->path);
    block_release(j->blk);
    free(j);
}

static void *writer_main(void *arg);

/* With q_lock held: start another thread for ``pool`` if all of its threads are busy and it may have more; an
 * error only if the pool has no thread at all. */
static int start_thread(int pool) {
    int limit = pool == DURABLE ? DURABLE_THREADS : 1;
    if (q_threads[pool] >= limit || (q_threads[pool] > 0 && q_idle[pool] > 0)) return 0;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&thread, &attr, writer_main, (void *)(intptr_t)pool);
    pthread_attr_destroy(&attr);
    if (rc == 0) q_threads[pool]++;
    return q_threads[pool] == 0 ? rc : 0;
}

/* With q_lock held: queue ``j`` on ``pool`` (0, or an errno if no thread could be started). */
static int push_job(job *j, int pool) {
    int rc = start_thread(pool);
    if (rc != 0) return rc;
    if (q_tail[pool] != NULL) q_tail[pool]->next = j; else q_head[pool] = j;
    q_tail[pool] = j;
    if (pool == ORDERED) q_submitted++;
    q_inflight++;
    pthread_cond_signal(&q_work[pool]);
    return 0;
}

/* A durable file whose directory is fsync'd by the DIRSYNC thread while this one writes and flushes the data
 * (write_file's work otherwise): 0 or an errno, the file removed on failure. */
static int write_file_dir_beside(job *j) {
    int fd = open(j->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return errno;
    job *d = calloc(1, sizeof(job));
    char *copy = d != NULL ? strdup(j->path) : NULL;
    int queued = 0;
    if (copy != NULL) {
        d->path = strdup(dirname(copy));
        d->dir_sync = 1;
        d->sync_fd = -1;
        if (d->path != NULL) {
            pthread_mutex_lock(&q_lock);
            queued = push_job(d, DIRSYNC) == 0;
            pthread_mutex_unlock(&q_lock);
        }
    }
    free(copy);
    if (!queued && d != NULL) free_job(d);
    int err = fill_file(fd, j->data, j->size, j->sync, j->direct);
    if (queued) {
        pthread_mutex_lock(&q_lock);
        while (!d->done) pthread_cond_wait(&q_done, &q_lock);
        pthread_mutex_unlock(&q_lock);
        if (err == 0) err = d->err;
        free_job(d);
    } else if (err == 0 && sync_parent(j->path) < 0) {
        err = errno;
    }
    if (err != 0) unlink(j->path);
    return err;
}

static int sync_dir_path(const char *path) {
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return errno;
    int err = fsync(dfd) != 0 ? errno : 0;
    close(dfd);
    return err;
}

/* The notify pipe (notify_fd()): a byte is written to it when a job submitted with notify finishes, so that an
 * event loop watching its read end learns of it without a thread of its own. Made on first use, under q_lock. */
static int q_notify_rd = -1, q_notify_wr = -1;

/* Record the outcome of ``j`` (its work done) and signal whoever waits. */
static void finish_job(job *j, int pool, int err) {
    block_release(j->blk);
    j->blk = NULL;
    j->data = NULL;
    int notify = j->notify;
    pthread_mutex_lock(&q_lock);
    if (pool == ORDERED) q_completed++;
    q_inflight--;
    if (j->orphan) {
        free_job(j);
    } else {
        j->err = err;
        j->done = 1;
    }
    pthread_cond_broadcast(&q_done);
    int wr = q_notify_wr;
    pthread_mutex_unlock(&q_lock);
    if (notify && wr >= 0) {
        ssize_t ignored = write(wr, "", 1); /* EAGAIN when the pipe is full: the reader has a byte to wake it */
        (void)ignored;
    }
}

static void run_job(job *j, int pool) {
    int err = 0;
    if (j->dir_sync) {
        err = sync_dir_path(j->path);
    } else if (j->path != NULL) {
        err = j->sync_dir && j->sync ? write_file_dir_beside(j)
                                     : write_file(j->path, j->data, j->size, j->sync, j->sync_dir, j->direct);
    } else if (fdatasync(j->sync_fd) != 0) {
        err = errno;
    }
    finish_job(j, pool, err);
}

/* The DIRSYNC batch: one fsync per directory for all of its jobs. Each job's file was created before its job was
 * queued, so before the batch was taken: one fsync that starts now covers them all. */
static void run_dir_syncs(job *batch) {
    while (batch != NULL) {
        char *path = strdup(batch->path);
        if (path == NULL) { /* one at a time */
            job *j = batch;
            batch = j->next;
            finish_job(j, DIRSYNC, sync_dir_path(j->path));
            continue;
        }
        int err = sync_dir_path(path);
        job *rest = NULL, **tail = &rest;
        while (batch != NULL) {
            job *j = batch;
            batch = j->next;
            j->next = NULL;
            if (strcmp(j->path, path) == 0) {
                finish_job(j, DIRSYNC, err);
            } else {
                *tail = j;
                tail = &j->next;
            }
        }
        free(path);
        batch = rest;
    }
}

static void *writer_main(void *arg) {
    int pool = (int)(intptr_t)arg;
    pthread_mutex_lock(&q_lock);
    for (;;) {
        q_idle[pool]++;
        while (q_head[pool] == NULL) pthread_cond_wait(&q_work[pool], &q_lock);
        q_idle[pool]--;
        job *batch = q_head[pool];
        if (pool != DURABLE) { /* all of them, in order */
            q_head[pool] = q_tail[pool] = NULL;
        } else { /* one: the other threads take the next */
            q_head[pool] = batch->next;
            if (q_head[pool] == NULL) q_tail[pool] = NULL;
            batch->next = NULL;
        }
        pthread_mutex_unlock(&q_lock);
        if (pool == DIRSYNC) {
            run_dir_syncs(batch);
        } else {
            while (batch != NULL) {
                job *j = batch;
                batch = j->next;
                run_job(j, pool);
            }
        }
        pthread_mutex_lock(&q_lock);
    }
    return NULL;
}

/* A forked child has none of its parent's threads: it starts its own on its first submit. */
static void after_fork_child(void) {
    pthread_mutex_init(&q_lock, NULL);
    pthread_mutex_init(&spare_lock, NULL); /* the spare buffers are this process's copies: kept */
    pthread_cond_init(&q_done, NULL);
    for (int pool = 0; pool < POOLS; pool++) {
        pthread_cond_init(&q_work[pool], NULL);
        q_head[pool] = q_tail[pool] = NULL; /* the parent's jobs: its Pendings here raise instead of waiting */
        q_threads[pool] = q_idle[pool] = 0;
    }
    q_submitted = q_completed = q_inflight = 0;
    q_generation++;
    if (q_notify_rd >= 0) close(q_notify_rd); /* the parent's event loop watches them */
    if (q_notify_wr >= 0) close(q_notify_wr);
    q_notify_rd = q_notify_wr = -1;
}

typedef struct {
    PyObject_HEAD
    job *job;
    uint64_t generation;
    PyObject *path; /* for the error */
} Pending;

static void pending_dealloc(Pending *self) {
    if (self->job != NULL) {
        pthread_mutex_lock(&q_lock);
        if (self->generation != q_generation || self->job->done) {
            if (self->generation == q_generation) free_job(self->job);
        } else {
            self->job->orphan = 1;
        }
        pthread_mutex_unlock(&q_lock);
    }
    Py_XDECREF(self->path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *pending_wait(Pending *self, PyObject *unused) {
    if (self->generation != q_generation) {
        PyErr_SetString(PyExc_RuntimeError, "file write submitted by the parent of this forked process");
        return NULL;
    }
    int err;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&q_lock);
    while (!self->job->done) pthread_cond_wait(&q_done, &q_lock);
    err = self->job->err;
    pthread_mutex_unlock(&q_lock);
    Py_END_ALLOW_THREADS
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, self->path);
    }
    Py_RETURN_NONE;
}

static PyObject *pending_done(Pending *self, PyObject *unused) {
    pthread_mutex_lock(&q_lock);
    int done = self->generation == q_generation && self->job->done;
    pthread_mutex_unlock(&q_lock);
    return PyBool_FromLong(done);
}

static PyMethodDef pending_methods[] = {
    {"wait", (PyCFunction)pending_wait, METH_NOARGS,
     "wait(): return once the file is written; raise the OSError its write met (FileExistsError: it existed)"},
    {"done", (PyCFunction)pending_done, METH_NOARGS, "done(): whether the write has finished"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bastion.blobs._cwrite.Pending",
    .tp_basicsize = sizeof(Pending),
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A file being written by the writer thread (submit)",
    .tp_methods = pending_methods,
};

/* Queue ``j`` (the thread started if need be) and return its Pending; frees ``j`` on failure. */
static PyObject *enqueue(job *j, PyObject *path_arg) {
    Pending *pending = PyObject_New(Pending, &PendingType);
    if (pending == NULL) {
        free_job(j);
        return NULL;
    }
    Py_XINCREF(path_arg);
    pending->path = path_arg;
    pending->job = j;
    int pool = j->sync || j->parallel ? DURABLE : ORDERED;
    pthread_mutex_lock(&q_lock);
    pending->generation = q_generation;
    int rc = push_job(j, pool);
    if (rc != 0) {
        pthread_mutex_unlock(&q_lock);
        pending->job = NULL;
        free_job(j);
        Py_DECREF(pending);
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_mutex_unlock(&q_lock);
    return (PyObject *)pending;
}

static PyTypeObject BufferType;
typedef struct {
    PyObject_HEAD
    block *blk; /* NULL until the first byte */
    Py_ssize_t len;
    Py_ssize_t exports;
    int frozen; /* set by submit(): blk is shared with a writer thread, never written again */
} Buffer;

static PyObject *submit(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "data", "sync", "sync_dir", "direct", "notify", NULL};
    PyObject *path_arg, *path_obj, *data_arg;
    int sync = 0, sync_dir = 0, direct = 0, notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$pppp", kwlist, &path_arg, &data_arg, &sync, &sync_dir,
                                     &direct, &notify))
        return NULL;
    if (!PyUnicode_FSConverter(path_arg, &path_obj)) return NULL;
    job *j = calloc(1, sizeof(job));
    if (j != NULL) j->path = strdup(PyBytes_AS_STRING(path_obj));
    Py_DECREF(path_obj);
    if (j == NULL || j->path == NULL) {
        if (j != NULL) free_job(j);
        return PyErr_NoMemory();
    }
    int is_buffer = PyObject_TypeCheck(data_arg, &BufferType);
    if (is_buffer) ((Buffer *)data_arg)->frozen = 1; /* before the job shares it: no write can come after */
    if (is_buffer && ((Buffer *)data_arg)->blk != NULL) {
        /* its memory as it is, shared with the job: the Buffer is frozen */
        Buffer *buf = (Buffer *)data_arg;
        __atomic_add_fetch(&buf->blk->refs, 1, __ATOMIC_ACQ_REL);
        j->blk = buf->blk;
        j->size = (size_t)buf->len;
    } else {
        Py_buffer data;
        if (PyObject_GetBuffer(data_arg, &data, PyBUF_SIMPLE) < 0) {
            free_job(j);
            return NULL;
        }
        /* a page-aligned copy, so that O_DIRECT writes the whole pages straight from it */
        j->blk = block_new((size_t)data.len);
        if (j->blk != NULL) memcpy(j->blk->data, data.buf, (size_t)data.len);
        j->size = (size_t)data.len;
        PyBuffer_Release(&data);
        if (j->blk == NULL) {
            free_job(j);
            return PyErr_NoMemory();
        }
    }
    j->data = j->blk->data;
    j->sync_fd = -1;
    j->sync = sync;
    j->notify = notify;
    j->sync_dir = sync_dir;
    j->direct = direct;
    return enqueue(j, path_arg);
}

/* -- Buffer: an object's bytes as they arrive, in memory submit() writes without copying ------------------- */

/* 0, or -1 with BufferError set if ``self`` was submitted: its memory is a writer thread's to read. */
static int buffer_check_writable(Buffer *self) {
    if (!self->frozen) return 0;
    PyErr_SetString(PyExc_BufferError, "Buffer: submitted to a writer thread, it cannot be written any more");
    return -1;
}

static int buffer_reserve(Buffer *self, size_t need) {
    if (buffer_check_writable(self) < 0) return -1;
    if (self->blk != NULL && need <= self->blk->cap) return 0;
    if (self->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "Buffer: cannot grow while a view of it exists");
        return -1;
    }
    size_t cap = self->blk != NULL ? self->blk->cap * 2 : 0;
    if (cap < need) cap = need;
    block *grown = block_new(cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (self->blk != NULL) {
        memcpy(grown->data, self->blk->data, (size_t)self->len);
        block_release(self->blk);
    }
    self->blk = grown;
    return 0;
}

static int buffer_init(Buffer *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t capacity = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n", kwlist, &capacity)) return -1;
    if (buffer_check_writable(self) < 0) return -1;
    if (self->blk != NULL || self->exports > 0) {
        PyErr_SetString(PyExc_TypeError, "Buffer: already initialised");
        return -1;
    }
    self->len = 0;
    return capacity > 0 ? buffer_reserve(self, (size_t)capacity) : 0;
}

static void buffer_dealloc(Buffer *self) {
    block_release(self->blk);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *buffer_extend(Buffer *self, PyObject *arg) {
    Py_buffer data;
    if (buffer_check_writable(self) < 0) return NULL; /* even for no bytes: a frozen Buffer takes no write */
    if (PyObject_GetBuffer(arg, &data, PyBUF_SIMPLE) < 0) return NULL;
    int rc = buffer_reserve(self, (size_t)self->len + (size_t)data.len);
    if (rc == 0 && data.len > 0) {
        memcpy(self->blk->data + self->len, data.buf, (size_t)data.len);
        self->len += data.len;
    }
    PyBuffer_Release(&data);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *buffer_iadd(PyObject *self, PyObject *arg) {
    PyObject *done = buffer_extend((Buffer *)self, arg);
    if (done == NULL) return NULL;
    Py_DECREF(done);
    return Py_NewRef(self);
}

static Py_ssize_t buffer_length(PyObject *self) { return ((Buffer *)self)->len; }

static int buffer_getbuffer(PyObject *obj, Py_buffer *view, int flags) {
    Buffer *self = (Buffer *)obj;
    static unsigned char empty[1];
    if (PyBuffer_FillInfo(view, obj, self->blk != NULL ? self->blk->data : empty, self->len, 1, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void buffer_releasebuffer(PyObject *obj, Py_buffer *view) { ((Buffer *)obj)->exports--; }

static PyObject *buffer_get_frozen(PyObject *self, void *closure) { return PyBool_FromLong(((Buffer *)self)->frozen); }

static PyMethodDef buffer_methods[] = {
    {"extend", (PyCFunction)buffer_extend, METH_O,
     "extend(data): append data's bytes; BufferError once the Buffer was submitted"},
    {NULL, NULL, 0, NULL},
};
static PyGetSetDef buffer_getset[] = {
    {"frozen", buffer_get_frozen, NULL, "whether submit() took the Buffer: it can be read, never written again",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};
static PyNumberMethods buffer_as_number = {.nb_inplace_add = buffer_iadd};
static PySequenceMethods buffer_as_sequence = {.sq_length = buffer_length};
static PyBufferProcs buffer_as_buffer = {buffer_getbuffer, buffer_releasebuffer};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bastion.blobs._cwrite.Buffer",
    .tp_basicsize = sizeof(Buffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Buffer(capacity=0): bytes appended with += or extend(), read through the buffer protocol "
              "(read-only); submit() writes them without a copy and freezes the Buffer: any later write raises "
              "BufferError. It cannot grow while a view of it exists.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)buffer_init,
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_methods = buffer_methods,
    .tp_getset = buffer_getset,
    .tp_as_number = &buffer_as_number,
    .tp_as_sequence = &buffer_as_sequence,
    .tp_as_buffer = &buffer_as_buffer,
};

static PyObject *submit_sync(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"fd", "parallel", "notify", NULL};
    int fd, parallel = 0, notify = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|$pp", kwlist, &fd, &parallel, &notify)) return NULL;
    job *j = calloc(1, sizeof(job));
    if (j == NULL) return PyErr_NoMemory();
    j->sync_fd = fd;
    j->parallel = parallel;
    j->notify = notify;
    return enqueue(j, NULL);
}

static int nonblocking_cloexec(int fd) {
    int fl = fcntl(fd, F_GETFL);
    int fdfl = fcntl(fd, F_GETFD);
    if (fl < 0 || fdfl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0)
        return -1;
    return 0;
}

static PyObject *notify_fd(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&q_lock);
    int err = 0;
    if (q_notify_rd < 0) {
        int fds[2];
        if (pipe(fds) != 0) {
            err = errno;
        } else if (nonblocking_cloexec(fds[0]) < 0 || nonblocking_cloexec(fds[1]) < 0) {
            err = errno;
            close(fds[0]);
            close(fds[1]);
        } else {
            q_notify_rd = fds[0];
            q_notify_wr = fds[1];
        }
    }
    int fd = q_notify_rd;
    pthread_mutex_unlock(&q_lock);
    if (fd < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

static PyObject *barrier(PyObject *self, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&q_lock);
    uint64_t target = q_submitted;
    while (q_completed < target) pthread_cond_wait(&q_done, &q_lock);
    pthread_mutex_unlock(&q_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *ordered_idle(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&q_lock);
    int idle = q_completed == q_submitted;
    pthread_mutex_unlock(&q_lock);
    return PyBool_FromLong(idle);
}

static PyObject *drain(PyObject *self, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&q_lock);
    while (q_inflight > 0) pthread_cond_wait(&q_done, &q_lock);
    pthread_mutex_unlock(&q_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"create_file", create_file, METH_VARARGS,
     "create_file(path, data, sync, sync_dir, direct): create path holding data, without the GIL (see the module)"},
    {"submit", (PyCFunction)(void (*)(void))submit, METH_VARARGS | METH_KEYWORDS,
     "submit(path, data, *, sync=False, sync_dir=False, direct=False, notify=False) -> Pending: "
     "create_file in a writer thread, from a copy of data, or a Buffer's own memory, the Buffer frozen "
     "(see the module)"},
    {"barrier", barrier, METH_NOARGS, "barrier(): return once every ORDERED job submitted before the call is done"},
    {"ordered_idle", ordered_idle, METH_NOARGS,
     "ordered_idle(): whether every ORDERED job submitted so far is done (no other store's file is waiting there)"},
    {"drain", drain, METH_NOARGS,
     "drain(): return once no job of either queue is left (before a journal closes the segments flushes name)"},
    {"submit_sync", (PyCFunction)(void (*)(void))submit_sync, METH_VARARGS | METH_KEYWORDS,
     "submit_sync(fd, *, parallel=False, notify=False) -> Pending: fdatasync(fd) after the jobs "
     "submitted before it, or with parallel in a thread for durable files, beside them"},
    {"notify_fd", notify_fd, METH_NOARGS,
     "notify_fd(): the read end of a non-blocking pipe that gets a byte whenever a job submitted with "
     "notify=True finishes (see the module)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cwrite", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cwrite(void) {
    if (PyType_Ready(&PendingType) < 0 || PyType_Ready(&BufferType) < 0) return NULL;
    static int atfork_set = 0;
    if (!atfork_set) {
        if (pthread_atfork(NULL, NULL, after_fork_child) != 0) return PyErr_NoMemory();
        atfork_set = 1;
    }
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    Py_INCREF(&PendingType);
    if (PyModule_AddObject(mod, "Pending", (PyObject *)&PendingType) < 0) {
        Py_DECREF(&PendingType);
        Py_DECREF(mod);
        return NULL;
    }
    Py_INCREF(&BufferType);
    if (PyModule_AddObject(mod, "Buffer", (PyObject *)&BufferType) < 0) {
        Py_DECREF(&BufferType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
