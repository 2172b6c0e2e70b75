/* The common case of recording a stored instance in the SQLite index, in C and without the GIL.
 *
 * bastion.index.sqlite_record.record records an instance with five statements run from Python: a lookup of the
 * instance and its series, study and patient rows, the instance's row, its series' count, the change log.
 * Through Python each cost a few microseconds more than the statement itself, and the writer lock that the
 * index's processes share was held meanwhile. A Recorder runs the same statements
 * (their SQL comes from Python: one definition) on a connection of its own, for the case that writes nothing
 * else: a SOP instance not yet indexed whose series, study and patient rows already hold what it would write.
 * Anything else (a new series, changed attributes, a re-sent or superseding object, a new modality or SOP
 * class in the study) makes begin() return None having written nothing, and Python records it. The conditions
 * below are the Python record's for writing no level row (sqlite_record._add_instance): change both together;
 * tests/unit/test_crecord.py compares every table the two write.
 *
 * begin() takes the writer lock (flock of the fd Python shares with it), starts the transaction and runs the
 * statements; the caller then waits for the object's blob to be durable and calls commit() or rollback(), as
 * the Python path does. One Recorder per process, used under the index's own lock (never two threads at once).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>
#include <string.h>
#include <sys/file.h>

static PyObject *RecordError = NULL; /* raised with SQLite's message; Python makes it an IndexFailure */

enum { ST_LOOKUP, ST_INSERT, ST_COUNT, ST_CHANGE, ST_COUNT_ };

typedef struct {
    PyObject_HEAD
    sqlite3 *db;
    int lock_fd;
    int locked;
    int in_txn;
    sqlite3_stmt *st[ST_COUNT_];
} Recorder;

typedef struct {
    const char *s;
    Py_ssize_t n;
} text;

/* Whether ``tok`` is one of the backslash-separated values of ``list`` (ModalitiesInStudy, SOPClassesInStudy). */
static int has_value(const unsigned char *list, int len, const char *tok, Py_ssize_t toklen) {
    if (list == NULL) return 0;
    int start = 0;
    for (int i = 0; i <= len; i++) {
        if (i == len || list[i] == '\\') {
            if (i - start == toklen && memcmp(list + start, tok, (size_t)toklen) == 0) return 1;
            start = i + 1;
        }
    }
    return 0;
}

static int same_text(sqlite3_stmt *st, int col, text t) {
    if (sqlite3_column_type(st, col) == SQLITE_NULL) return 0;
    const unsigned char *v = sqlite3_column_text(st, col);
    return v != NULL && sqlite3_column_bytes(st, col) == t.n && memcmp(v, t.s, (size_t)t.n) == 0;
}

static int is_one(sqlite3_stmt *st, int col) {
    return sqlite3_column_type(st, col) == SQLITE_INTEGER && sqlite3_column_int(st, col) == 1;
}

static void unlock(Recorder *r) {
    if (r->locked) {
        flock(r->lock_fd, LOCK_UN);
        r->locked = 0;
    }
}

/* Without the GIL: end an open transaction and release the lock. */
static void abandon(Recorder *r) {
    if (r->in_txn) {
        sqlite3_exec(r->db, "ROLLBACK", NULL, NULL, NULL);
        r->in_txn = 0;
    }
    unlock(r);
}

static PyObject *fail(Recorder *r, const char *what) {
    PyErr_Format(RecordError, "%s: %s", what, r->db != NULL ? sqlite3_errmsg(r->db) : "closed");
    return NULL;
}

static int Recorder_init(Recorder *r, PyObject *args, PyObject *kwds) {
    const char *path, *pragmas, *sql[ST_COUNT_];
    int lock_fd;
    if (!PyArg_ParseTuple(args, "sissss|s", &path, &lock_fd, &sql[ST_LOOKUP], &sql[ST_INSERT], &sql[ST_COUNT],
                          &sql[ST_CHANGE], &pragmas))
        return -1;
    if (PyTuple_GET_SIZE(args) < 7) pragmas = "";
    r->lock_fd = lock_fd;
    int rc = sqlite3_open_v2(path, &r->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) rc = sqlite3_busy_timeout(r->db, 60000);
    if (rc == SQLITE_OK) rc = sqlite3_exec(r->db, pragmas, NULL, NULL, NULL);
    for (int i = 0; rc == SQLITE_OK && i < ST_COUNT_; i++)
        rc = sqlite3_prepare_v3(r->db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, &r->st[i], NULL);
    if (rc != SQLITE_OK) {
        fail(r, "cannot open the index for recording");
        return -1;
    }
    return 0;
}

static void close_db(Recorder *r) {
    abandon(r);
    for (int i = 0; i < ST_COUNT_; i++) {
        sqlite3_finalize(r->st[i]);
        r->st[i] = NULL;
    }
    if (r->db != NULL) sqlite3_close_v2(r->db);
    r->db = NULL;
}

static void Recorder_dealloc(Recorder *r) {
    close_db(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* The arguments of begin(), in this order. */
enum {
    A_SOP, A_CLASS, A_SERIES, A_STUDY, A_TS, A_KEY, A_DIGEST, A_PATIENT, A_STAMP,
    A_SERIES_TEXT, A_STUDY_TEXT, A_PATIENT_TEXT, A_IMAGE_TEXT, A_MODALITY, A_AT, A_TEXTS_
};

/* Without the GIL. 1: done, the transaction open; 0: not the common case (nothing written, no transaction);
 * -1: an SQLite error (the transaction rolled back). */
static int record(Recorder *r, const text *a, long long size, int has_number, long long number,
                  sqlite3_int64 *seq) {
    if (r->lock_fd >= 0) {
        if (flock(r->lock_fd, LOCK_EX) != 0) return -1;
        r->locked = 1;
    }
    if (sqlite3_exec(r->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        unlock(r);
        return -1;
    }
    r->in_txn = 1;
    sqlite3_stmt *st = r->st[ST_LOOKUP];
    /* _LOOKUP: the three level texts to compare, then the SOP instance, series, study and patient keys */
    const int lookup_args[] = {A_SERIES_TEXT, A_STUDY_TEXT, A_PATIENT_TEXT, A_SOP, A_SERIES, A_STUDY, A_PATIENT};
    for (int i = 0; i < 7; i++)
        sqlite3_bind_text(st, i + 1, a[lookup_args[i]].s, (int)a[lookup_args[i]].n, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    int common = 0;
    if (rc == SQLITE_ROW) {
        /* columns: 0 i.blob_key, 6 se.modality, 7 se.attrs = ?, 8 se.study_uid, 9 st.modalities,
         * 10 st.sop_classes, 11 st.attrs = ?, 12 st.patient_id, 13 p.attrs = ? */
        common = sqlite3_column_type(st, 0) == SQLITE_NULL && is_one(st, 7) && is_one(st, 11) && is_one(st, 13)
                 && same_text(st, 8, a[A_STUDY]) && same_text(st, 12, a[A_PATIENT])
                 && same_text(st, 6, a[A_MODALITY])
                 && (a[A_MODALITY].n == 0 || has_value(sqlite3_column_text(st, 9), sqlite3_column_bytes(st, 9),
                                                       a[A_MODALITY].s, a[A_MODALITY].n))
                 && has_value(sqlite3_column_text(st, 10), sqlite3_column_bytes(st, 10), a[A_CLASS].s, a[A_CLASS].n);
        rc = SQLITE_OK;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_OK) goto error;
    if (!common) {
        abandon(r);
        return 0;
    }
    st = r->st[ST_INSERT]; /* instances: sop, series, study, class, number, ts, key, digest, size, stamp, attrs */
    const int insert_args[] = {A_SOP, A_SERIES, A_STUDY, A_CLASS};
    for (int i = 0; i < 4; i++)
        sqlite3_bind_text(st, i + 1, a[insert_args[i]].s, (int)a[insert_args[i]].n, SQLITE_STATIC);
    if (has_number) sqlite3_bind_int64(st, 5, number); else sqlite3_bind_null(st, 5);
    sqlite3_bind_text(st, 6, a[A_TS].s, (int)a[A_TS].n, SQLITE_STATIC);
    sqlite3_bind_text(st, 7, a[A_KEY].s, (int)a[A_KEY].n, SQLITE_STATIC);
    sqlite3_bind_text(st, 8, a[A_DIGEST].s, (int)a[A_DIGEST].n, SQLITE_STATIC);
    sqlite3_bind_int64(st, 9, size);
    sqlite3_bind_text(st, 10, a[A_STAMP].s, (int)a[A_STAMP].n, SQLITE_STATIC);
    sqlite3_bind_text(st, 11, a[A_IMAGE_TEXT].s, (int)a[A_IMAGE_TEXT].n, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE) goto error;
    st = r->st[ST_COUNT];
    sqlite3_bind_text(st, 1, a[A_SERIES].s, (int)a[A_SERIES].n, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE) goto error;
    st = r->st[ST_CHANGE]; /* changes: kind, sop, series, study, key, at */
    sqlite3_bind_text(st, 1, "stored", 6, SQLITE_STATIC);
    const int change_args[] = {A_SOP, A_SERIES, A_STUDY, A_KEY, A_AT};
    for (int i = 0; i < 5; i++)
        sqlite3_bind_text(st, i + 2, a[change_args[i]].s, (int)a[change_args[i]].n, SQLITE_STATIC);
    rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE) goto error;
    *seq = sqlite3_last_insert_rowid(r->db);
    return 1;
error:
    return -1;
}

static PyObject *Recorder_begin(Recorder *r, PyObject *args) {
    text a[A_TEXTS_];
    long long size;
    PyObject *number;
    if (r->db == NULL) return fail(r, "closed");
    if (r->in_txn || r->locked) {
        PyErr_SetString(PyExc_RuntimeError, "begin() while a record is open");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "s#s#s#s#s#s#s#Ls#s#s#s#s#s#Os#s#", &a[A_SOP].s, &a[A_SOP].n, &a[A_CLASS].s,
                          &a[A_CLASS].n, &a[A_SERIES].s, &a[A_SERIES].n, &a[A_STUDY].s, &a[A_STUDY].n, &a[A_TS].s,
                          &a[A_TS].n, &a[A_KEY].s, &a[A_KEY].n, &a[A_DIGEST].s, &a[A_DIGEST].n, &size,
                          &a[A_PATIENT].s, &a[A_PATIENT].n, &a[A_STAMP].s, &a[A_STAMP].n, &a[A_SERIES_TEXT].s,
                          &a[A_SERIES_TEXT].n, &a[A_STUDY_TEXT].s, &a[A_STUDY_TEXT].n, &a[A_PATIENT_TEXT].s,
                          &a[A_PATIENT_TEXT].n, &a[A_IMAGE_TEXT].s, &a[A_IMAGE_TEXT].n, &number,
                          &a[A_MODALITY].s, &a[A_MODALITY].n, &a[A_AT].s, &a[A_AT].n))
        return NULL;
    int has_number = number != Py_None;
    long long n = 0;
    if (has_number) {
        n = PyLong_AsLongLong(number);
        if (n == -1 && PyErr_Occurred()) return NULL;
    }
    for (int i = 0; i < A_TEXTS_; i++)
        if (a[i].n > 0x7fffffff) {
            PyErr_SetString(PyExc_ValueError, "a value too long for the index");
            return NULL;
        }
    sqlite3_int64 seq = 0;
    int done;
    Py_BEGIN_ALLOW_THREADS /* the str arguments, and so their UTF-8, live until the call returns */
    done = record(r, a, size, has_number, n, &seq);
    Py_END_ALLOW_THREADS
    if (done < 0) {
        PyObject *err = fail(r, "index write failed");
        Py_BEGIN_ALLOW_THREADS
        abandon(r);
        Py_END_ALLOW_THREADS
        return err;
    }
    if (done == 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(seq);
}

static PyObject *Recorder_commit(Recorder *r, PyObject *unused) {
    if (!r->in_txn) {
        PyErr_SetString(PyExc_RuntimeError, "commit() without a record");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sqlite3_exec(r->db, "COMMIT", NULL, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (rc != SQLITE_OK) {
        PyObject *err = fail(r, "index commit failed");
        Py_BEGIN_ALLOW_THREADS
        abandon(r);
        Py_END_ALLOW_THREADS
        return err;
    }
    r->in_txn = 0;
    unlock(r);
    Py_RETURN_NONE;
}

static PyObject *Recorder_rollback(Recorder *r, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    abandon(r);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Recorder_close(Recorder *r, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    close_db(r);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Recorder_methods[] = {
    {"begin", (PyCFunction)Recorder_begin, METH_VARARGS,
     "begin(sop, sop_class, series, study, ts, blob_key, digest, size, patient_id, stamp, series_text, study_text, "
     "patient_text, image_text, instance_number, modality, at) -> seq, the transaction open; None where the "
     "instance is not the common case (nothing written)"},
    {"commit", (PyCFunction)Recorder_commit, METH_NOARGS, "commit the record begin() wrote"},
    {"rollback", (PyCFunction)Recorder_rollback, METH_NOARGS, "undo the record begin() wrote"},
    {"close", (PyCFunction)Recorder_close, METH_NOARGS, "close the connection"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bastion.index._crecord.Recorder",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Recorder(path, lock_fd, lookup_sql, insert_sql, count_sql, change_sql, pragmas='')",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_methods = Recorder_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_crecord", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__crecord(void) {
    if (PyType_Ready(&RecorderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    RecordError = PyErr_NewException("bastion.index._crecord.RecordError", NULL, NULL);
    Py_INCREF(&RecorderType);
    if (RecordError == NULL || PyModule_AddObject(m, "Recorder", (PyObject *)&RecorderType) < 0 ||
        PyModule_AddObject(m, "RecordError", RecordError) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
