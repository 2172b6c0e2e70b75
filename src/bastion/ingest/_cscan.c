/* C versions of the two hottest functions of the store path: bastion.ingest.scan.scan_header and
 * bastion.ingest.header.raw_json. Each gives exactly what its Python twin gives (results and which
 * inputs are "not simple"); tests/unit/test_cscan.py checks that on the benchmark corpora, pydicom's
 * sample files and fuzzed headers. The Python versions stay the reference and the fallback where this
 * module could not be built.
 *
 * Everything here reads untrusted bytes from the network: every read is bounds-checked against the
 * buffer's length, positions are 64-bit, and nesting is limited as in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *NotSimple = NULL; /* bastion.ingest.scan.NotSimple, set by init() */

#define UNDEFINED 0xFFFFFFFFu
#define TAG_ITEM 0xFFFEE000u
#define TAG_ITEM_END 0xFFFEE00Du
#define TAG_SEQ_END 0xFFFEE0DDu
#define MAX_DEPTH 16

static const char *EXPLICIT_LE = "1.2.840.10008.1.2.1";
static const char *IMPLICIT_LE = "1.2.840.10008.1.2";

static int not_simple(const char *why) {
    PyErr_SetString(NotSimple ? NotSimple : PyExc_ValueError, why);
    return -1;
}

static inline uint16_t u16le(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t u32le(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint32_t u32be(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* The VRs whose explicit-VR header has a 4-byte length (PS3.5 7.1.2). */
static int long_vr(const unsigned char *vr) {
    switch (vr[0]) {
    case 'O': return vr[1] == 'B' || vr[1] == 'D' || vr[1] == 'F' || vr[1] == 'L' || vr[1] == 'V' || vr[1] == 'W';
    case 'S': return vr[1] == 'Q' || vr[1] == 'V';
    case 'U': return vr[1] == 'C' || vr[1] == 'N' || vr[1] == 'R' || vr[1] == 'T' || vr[1] == 'V';
    default: return 0;
    }
}

static inline int upper_alpha(const unsigned char *vr) {
    return vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z';
}

/* bytes.decode("ascii", "replace").strip("\x00 ") */
static PyObject *meta_text(const unsigned char *p, Py_ssize_t n) {
    while (n > 0 && (p[0] == 0 || p[0] == ' ')) { p++; n--; }
    while (n > 0 && (p[n - 1] == 0 || p[n - 1] == ' ')) n--;
    return PyUnicode_DecodeASCII((const char *)p, n, "replace");
}

/* One element header at pos (Python's scan._element): 0, or -1 with NotSimple set. */
static int element(const unsigned char *buf, uint64_t size, uint64_t pos, int explicit_vr,
                   uint32_t *tag, uint32_t *length, uint64_t *hdr) {
    if (pos + 8 > size) return not_simple("header runs past the scanned block");
    uint16_t group = u16le(buf + pos), elem = u16le(buf + pos + 2);
    *tag = ((uint32_t)group << 16) | elem;
    if (group == 0xFFFE || !explicit_vr) {
        *length = u32le(buf + pos + 4);
        *hdr = 8;
        return 0;
    }
    const unsigned char *vr = buf + pos + 4;
    if (!upper_alpha(vr)) return not_simple("not explicit VR after all");
    if (long_vr(vr)) {
        if (pos + 12 > size) return not_simple("header runs past the scanned block");
        *length = u32le(buf + pos + 8);
        *hdr = 12;
        return 0;
    }
    *length = u16le(buf + pos + 6);
    *hdr = 8;
    return 0;
}

/* Skip the items of an undefined-length value starting at pos (Python's scan._skip_items). */
static int skip_items(const unsigned char *buf, uint64_t size, uint64_t *pos, int explicit_vr, int depth) {
    if (depth > MAX_DEPTH) return not_simple("sequences nested too deep");
    uint32_t tag, length;
    uint64_t hdr;
    for (;;) {
        if (element(buf, size, *pos, explicit_vr, &tag, &length, &hdr) < 0) return -1;
        *pos += hdr;
        if (tag == TAG_SEQ_END) return 0;
        if (tag != TAG_ITEM) return not_simple("unexpected element in a sequence");
        if (length != UNDEFINED) {
            *pos += length;
            continue;
        }
        for (;;) {
            if (element(buf, size, *pos, explicit_vr, &tag, &length, &hdr) < 0) return -1;
            *pos += hdr;
            if (tag == TAG_ITEM_END) break;
            if (length == UNDEFINED) {
                if (skip_items(buf, size, pos, explicit_vr, depth + 1) < 0) return -1;
            } else {
                *pos += length;
            }
        }
    }
}

static int wanted_tag(const unsigned char *wanted, Py_ssize_t n, uint32_t tag) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo <= hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        uint32_t t = u32be(wanted + 4 * mid);
        if (t == tag) return 1;
        if (t < tag) lo = mid + 1; else hi = mid - 1;
    }
    return 0;
}

/* scan(buf, wanted) -> (transfer_syntax, meta_sop_uid | None, {tag: (vr | None, value)}, pixel_offset | None)
 * ``wanted``: the wanted tags as sorted big-endian uint32s. */
/* (vr, value) for scan()'s dict: the VR a str shared by every element of that VR (None: implicit VR). */
static PyObject *vr_names[26 * 26];

static PyObject *element_tuple(const unsigned char *vr, const unsigned char *value, Py_ssize_t length) {
    PyObject *name = Py_None;
    if (vr != NULL) {
        if (vr[0] < 'A' || vr[0] > 'Z' || vr[1] < 'A' || vr[1] > 'Z') {
            name = PyUnicode_FromStringAndSize((const char *)vr, 2); /* scan() checked upper_alpha; defensive */
            if (name == NULL) return NULL;
        } else {
            PyObject **slot = &vr_names[(vr[0] - 'A') * 26 + (vr[1] - 'A')];
            if (*slot == NULL) {
                *slot = PyUnicode_FromStringAndSize((const char *)vr, 2);
                if (*slot == NULL) return NULL;
                PyUnicode_InternInPlace(slot);
            }
            name = Py_NewRef(*slot);
        }
    } else {
        Py_INCREF(name);
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)value, length);
    PyObject *pair = bytes != NULL ? PyTuple_New(2) : NULL;
    if (pair == NULL) {
        Py_DECREF(name);
        Py_XDECREF(bytes);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, name);
    PyTuple_SET_ITEM(pair, 1, bytes);
    return pair;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer view, want;
    if (!PyArg_ParseTuple(args, "y*y*", &view, &want)) return NULL;
    PyObject *ts = NULL, *sop = NULL, *found = NULL, *result = NULL;
    const unsigned char *buf = view.buf;
    uint64_t size = (uint64_t)view.len, pos = 132;
    Py_ssize_t nwanted = want.len / 4;

    if (size < 144 || memcmp(buf + 128, "DICM", 4) != 0) { not_simple("no Part 10 preamble"); goto done; }
    /* The file meta group (always explicit VR little endian, PS3.10 7.1). */
    while (pos + 8 <= size) {
        uint16_t group = u16le(buf + pos), elem = u16le(buf + pos + 2);
        if (group != 0x0002) break;
        uint64_t length, hdr;
        if (long_vr(buf + pos + 4)) {
            if (pos + 12 > size) { not_simple("file meta runs past the scanned block"); goto done; }
            length = u32le(buf + pos + 8);
            hdr = 12;
        } else {
            length = u16le(buf + pos + 6);
            hdr = 8;
        }
        uint64_t start = pos + hdr < size ? pos + hdr : size;
        uint64_t end = start + length < size ? start + length : size;
        if (elem == 0x0010 || elem == 0x0003) {
            PyObject *text = meta_text(buf + start, (Py_ssize_t)(end - start));
            if (text == NULL) goto done;
            PyObject **slot = elem == 0x0010 ? &ts : &sop;
            Py_XSETREF(*slot, text);
        }
        pos += hdr + length;
    }
    if (ts == NULL) ts = PyUnicode_FromString("");
    if (ts == NULL) goto done;
    int explicit_vr;
    if (PyUnicode_CompareWithASCIIString(ts, EXPLICIT_LE) == 0) explicit_vr = 1;
    else if (PyUnicode_CompareWithASCIIString(ts, IMPLICIT_LE) == 0) explicit_vr = 0;
    else { PyErr_Format(NotSimple, "transfer syntax %U", ts); goto done; }

    found = PyDict_New();
    if (found == NULL) goto done;
    uint64_t pixel = UINT64_MAX;
    while (pos < size) {
        if (pos + 8 > size) { not_simple("header runs past the scanned block"); goto done; }
        uint16_t group = u16le(buf + pos), elem = u16le(buf + pos + 2);
        uint32_t tag = ((uint32_t)group << 16) | elem;
        if (tag == 0x7FE00010u || tag == 0x7FE00008u || tag == 0x7FE00009u) { pixel = pos; break; }
        if (group == 0xFFFE) { not_simple("item outside a sequence"); goto done; }
        const unsigned char *vr = NULL;
        uint64_t length, hdr;
        if (explicit_vr) {
            vr = buf + pos + 4;
            if (long_vr(vr)) {
                if (pos + 12 > size) { not_simple("header runs past the scanned block"); goto done; }
                length = u32le(buf + pos + 8);
                hdr = 12;
            } else if (upper_alpha(vr)) {
                length = u16le(buf + pos + 6);
                hdr = 8;
            } else { not_simple("not explicit VR after all"); goto done; }
        } else {
            length = u32le(buf + pos + 4);
            hdr = 8;
        }
        int is_wanted = wanted_tag(want.buf, nwanted, tag);
        if (length == UNDEFINED) {
            if (is_wanted) { not_simple("a wanted attribute is a sequence"); goto done; }
            pos += hdr;
            if (skip_items(buf, size, &pos, explicit_vr, 0) < 0) goto done;
            continue;
        }
        uint64_t end = pos + hdr + length;
        if (end > size) { not_simple("value runs past the scanned block"); goto done; }
        if (is_wanted) {
            if (vr != NULL && ((vr[0] == 'S' && vr[1] == 'Q') || (vr[0] == 'U' && vr[1] == 'N'))) {
                not_simple("a wanted attribute is a sequence or of unknown VR");
                goto done;
            }
            PyObject *key = PyLong_FromUnsignedLong(tag);
            PyObject *value = element_tuple(vr, buf + pos + hdr, (Py_ssize_t)length);
            int failed = key == NULL || value == NULL || PyDict_SetItem(found, key, value) < 0;
            Py_XDECREF(key);
            Py_XDECREF(value);
            if (failed) goto done;
        }
        pos = end;
    }
    if (pixel == UINT64_MAX)
        result = Py_BuildValue("(OOOO)", ts, sop ? sop : Py_None, found, Py_None);
    else
        result = Py_BuildValue("(OOOK)", ts, sop ? sop : Py_None, found, (unsigned long long)pixel);
done:
    Py_XDECREF(ts);
    Py_XDECREF(sop);
    Py_XDECREF(found);
    PyBuffer_Release(&view);
    PyBuffer_Release(&want);
    return result;
}

/* -- raw_json ------------------------------------------------------------------------------------------ */

static PyObject *s_vr, *s_Value, *s_Alphabetic;

static PyObject *just_vr(PyObject *vr) {
    PyObject *d = PyDict_New();
    if (d != NULL && PyDict_SetItem(d, s_vr, vr) < 0) Py_CLEAR(d);
    return d;
}

static PyObject *with_values(PyObject *vr, PyObject *values) {
    if (values == NULL) return NULL;
    PyObject *d = just_vr(vr);
    if (d != NULL && PyDict_SetItem(d, s_Value, values) < 0) Py_CLEAR(d);
    Py_DECREF(values);
    return d;
}

static double f32(const unsigned char *p, int little) {
    unsigned char b[4];
    for (int i = 0; i < 4; i++) b[i] = little ? p[i] : p[3 - i];
    return PyFloat_Unpack4((const char *)b, 1);
}

static double f64(const unsigned char *p, int little) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++) b[i] = little ? p[i] : p[7 - i];
    return PyFloat_Unpack8((const char *)b, 1);
}

static PyObject *binary_values(char kind, const unsigned char *p, Py_ssize_t len, int little) {
    int width = kind == 'H' || kind == 'h' ? 2 : kind == 'd' ? 8 : 4;
    Py_ssize_t n = len / width;
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *q = p + i * width;
        uint32_t raw = width == 2 ? (little ? (uint32_t)(q[0] | (q[1] << 8)) : (uint32_t)((q[0] << 8) | q[1]))
                     : width == 4 ? (little ? u32le(q) : u32be(q)) : 0;
        PyObject *item;
        switch (kind) {
        case 'H': case 'I': item = PyLong_FromUnsignedLong(raw); break;
        case 'h': item = PyLong_FromLong((int16_t)raw); break;
        case 'i': item = PyLong_FromLong((int32_t)raw); break;
        case 'f': item = PyFloat_FromDouble(f32(q, little)); break;
        default: item = PyFloat_FromDouble(f64(q, little)); break;
        }
        if (item == NULL || ((kind == 'f' || kind == 'd') && PyErr_Occurred())) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static int vr_is(const char *vr, const char *name) { return vr[0] == name[0] && vr[1] == name[1] && vr[2] == 0; }

/* The JSON of one element: ``vr_obj`` a str, ``value`` bytes or None. */
static PyObject *element_json(PyObject *vr_obj, PyObject *value, int little) {
    if (value == Py_None) return just_vr(vr_obj);
    if (!PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "raw_json: value must be bytes or None");
        return NULL;
    }
    Py_ssize_t vlen;
    const char *vr = PyUnicode_AsUTF8AndSize(vr_obj, &vlen);
    if (vr == NULL) return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    if (vlen != 2) Py_RETURN_NONE;
    char kind = vr_is(vr, "US") ? 'H' : vr_is(vr, "UL") ? 'I' : vr_is(vr, "SS") ? 'h' : vr_is(vr, "SL") ? 'i'
              : vr_is(vr, "FL") ? 'f' : vr_is(vr, "FD") ? 'd' : 0;
    if (kind) {
        PyObject *values = binary_values(kind, p, n, little);
        if (values == NULL) return NULL;
        if (PyList_GET_SIZE(values) == 0) {
            Py_DECREF(values);
            return just_vr(vr_obj);
        }
        return with_values(vr_obj, values);
    }
    static const char *text_vrs[] = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "IS", "DS",
                                     "LO", "LT", "PN", "SH", "ST", "UC", "UT", NULL};
    int known = 0;
    for (int i = 0; text_vrs[i]; i++) known |= vr_is(vr, text_vrs[i]);
    if (!known) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] >= 0x80 || p[i] == 0x1b) Py_RETURN_NONE; /* let pydicom apply the Specific Character Set */
    int whole = vr_is(vr, "LT") || vr_is(vr, "ST") || vr_is(vr, "UT");
    int right_only = vr_is(vr, "LT");
    int is_pn = vr_is(vr, "PN"), is_is = vr_is(vr, "IS"), is_ds = vr_is(vr, "DS");
    PyObject *values = PyList_New(0);
    if (values == NULL) return NULL;
    Py_ssize_t start = 0;
    while (start <= n) {
        Py_ssize_t stop = start;
        if (!whole) while (stop < n && p[stop] != '\\') stop++;
        else stop = n;
        Py_ssize_t a = start, b = stop;
        if (!right_only) while (a < b && (p[a] == ' ' || p[a] == 0)) a++;
        while (b > a && (p[b - 1] == ' ' || p[b - 1] == 0)) b--;
        if (b > a) {
            PyObject *text = PyUnicode_DecodeASCII((const char *)p + a, b - a, NULL);
            PyObject *item = NULL;
            if (text != NULL) {
                if (is_pn) {
                    item = PyDict_New();
                    if (item != NULL && PyDict_SetItem(item, s_Alphabetic, text) < 0) Py_CLEAR(item);
                } else if (is_is) {
                    item = PyObject_CallOneArg((PyObject *)&PyLong_Type, text);
                } else if (is_ds) {
                    item = PyFloat_FromString(text);
                } else {
                    item = Py_NewRef(text);
                }
                Py_DECREF(text);
            }
            if (item == NULL || PyList_Append(values, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(values);
                return NULL;
            }
            Py_DECREF(item);
        }
        start = stop + 1;
    }
    if (PyList_GET_SIZE(values) == 0) {
        Py_DECREF(values);
        return just_vr(vr_obj);
    }
    return with_values(vr_obj, values);
}

/* raw_json(vr, value, little_endian=True): see bastion.ingest.header.raw_json. */
static PyObject *raw_json(PyObject *self, PyObject *args) {
    PyObject *vr_obj, *value;
    int little = 1;
    if (!PyArg_ParseTuple(args, "UO|p", &vr_obj, &value, &little)) return NULL;
    return element_json(vr_obj, value, little);
}

/* The last results of each level, with the elements they were made from: an instance mostly repeats its
 * predecessor's patient, study and series attributes, and building their JSON again was most of levels()'s
 * work. A level whose elements all equal a cached result's gets that result itself. Every result is a read-only
 * view (types.MappingProxyType) of a dict that nothing else holds: no caller can change what another instance
 * is handed (the element dicts inside are the caller's to leave alone). Each level keeps its LEVEL_WAYS most
 * recently used results: associations storing different series at once take turns on one event loop, and with
 * one result per level each instance would find the other series'. */
#define LEVEL_CACHE 8
#define LEVEL_WAYS 4
static PyObject *cache_specs = NULL; /* the specs list the cache was made for */
typedef struct {
    Py_ssize_t n;
    PyObject **elements; /* n entries, NULL for an absent element */
    PyObject *out;       /* the read-only view handed out */
} cached_level;
static cached_level level_cache[LEVEL_CACHE][LEVEL_WAYS]; /* [level][0] the most recently used */

static void cache_clear(cached_level *c) {
    for (Py_ssize_t j = 0; j < c->n; j++) Py_XDECREF(c->elements[j]);
    PyMem_Free(c->elements);
    c->elements = NULL;
    c->n = 0;
    Py_CLEAR(c->out);
}

/* Whether ``c`` was made from exactly ``got`` (n elements). -1 on error. */
static int cache_match(cached_level *c, PyObject **got, Py_ssize_t n) {
    if (c->out == NULL || c->n != n) return 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *a = got[j], *b = c->elements[j];
        if (a == b) continue;
        if (a == NULL || b == NULL) return 0;
        int same = PyObject_RichCompareBool(a, b, Py_EQ);
        if (same <= 0) return same;
    }
    return 1;
}

/* The cached dict of level ``i`` made from ``got`` (borrowed, moved to the front), NULL if none; -1 in *err on
 * error. */
static PyObject *cache_hit(int i, PyObject **got, Py_ssize_t n, int *err) {
    cached_level *ways = level_cache[i];
    for (int w = 0; w < LEVEL_WAYS && ways[w].out != NULL; w++) {
        int same = cache_match(&ways[w], got, n);
        if (same < 0) { *err = 1; return NULL; }
        if (same) {
            cached_level found = ways[w];
            memmove(&ways[1], &ways[0], sizeof(cached_level) * (size_t)w);
            ways[0] = found;
            return found.out;
        }
    }
    return NULL;
}

/* Remember ``out``, made from ``got``, as level ``i``'s most recent result (the least recent one goes). */
static void cache_store(int i, PyObject **got, Py_ssize_t n, PyObject *out) {
    PyObject **copy = PyMem_Malloc(sizeof(PyObject *) * (size_t)(n > 0 ? n : 1));
    if (copy == NULL) return; /* no cache, no harm */
    cached_level *ways = level_cache[i];
    cache_clear(&ways[LEVEL_WAYS - 1]);
    memmove(&ways[1], &ways[0], sizeof(cached_level) * (LEVEL_WAYS - 1));
    for (Py_ssize_t j = 0; j < n; j++) copy[j] = Py_XNewRef(got[j]);
    ways[0].elements = copy;
    ways[0].n = n;
    ways[0].out = Py_NewRef(out);
}

/* One level's DICOM JSON, a new dict: ``tags`` its [(tag, key), ...], ``got`` their elements (NULL: absent).
 * NULL with NotSimple set where a value needs the general parser. */
static PyObject *level_dict(PyObject *tags, PyObject **got, Py_ssize_t ntags, PyObject *vrs) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    for (Py_ssize_t j = 0; j < ntags; j++) {
        PyObject *tag = PyTuple_GET_ITEM(PyList_GET_ITEM(tags, j), 0);
        PyObject *key = PyTuple_GET_ITEM(PyList_GET_ITEM(tags, j), 1);
        PyObject *element = got[j];
        if (element == NULL) continue;
        if (!PyTuple_Check(element) || PyTuple_GET_SIZE(element) != 2) {
            PyErr_SetString(PyExc_TypeError, "levels: elements must map tags to (vr, value)");
            goto fail;
        }
        PyObject *vr = PyTuple_GET_ITEM(element, 0), *value = PyTuple_GET_ITEM(element, 1);
        if (vr == Py_None || (PyUnicode_Check(vr) && PyUnicode_GET_LENGTH(vr) == 0)) {
            vr = PyDict_GetItemWithError(vrs, tag);
            if (vr == NULL) {
                if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, tag);
                goto fail;
            }
        }
        if (!PyUnicode_Check(vr)) {
            PyErr_SetString(PyExc_TypeError, "levels: a VR must be a str");
            goto fail;
        }
        PyObject *js = element_json(vr, value, 1);
        if (js == NULL) {
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                PyErr_Format(NotSimple, "%U needs the general parser (bad value)", key);
            }
            goto fail;
        }
        if (js == Py_None) {
            Py_DECREF(js);
            PyErr_Format(NotSimple, "%U needs the general parser", key);
            goto fail;
        }
        int failed = PyDict_SetItem(out, key, js) < 0;
        Py_DECREF(js);
        if (failed) goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* levels(elements, specs, vrs) -> {level: mappingproxy({key: json})}: the loop of header._from_scan.
 * ``elements``: scan()'s dict; ``specs``: [(level, [(tag, key), ...]), ...]; ``vrs``: {tag: dictionary VR}. */
static PyObject *levels(PyObject *self, PyObject *args) {
    PyObject *elements, *specs, *vrs;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &elements, &PyList_Type, &specs, &PyDict_Type, &vrs))
        return NULL;
    if (specs != cache_specs) { /* another caller's specs (tests): start over */
        for (int i = 0; i < LEVEL_CACHE; i++)
            for (int w = 0; w < LEVEL_WAYS; w++) cache_clear(&level_cache[i][w]);
        Py_XSETREF(cache_specs, Py_NewRef(specs));
    }
    PyObject *result = PyDict_New();
    PyObject **got = NULL;
    if (result == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(specs); i++) {
        PyObject *spec = PyList_GET_ITEM(specs, i);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 || !PyList_Check(PyTuple_GET_ITEM(spec, 1))) {
            PyErr_SetString(PyExc_TypeError, "levels: specs must be (level, [(tag, key), ...]) pairs");
            goto fail;
        }
        PyObject *level = PyTuple_GET_ITEM(spec, 0), *tags = PyTuple_GET_ITEM(spec, 1);
        Py_ssize_t ntags = PyList_GET_SIZE(tags);
        PyMem_Free(got);
        got = PyMem_Malloc(sizeof(PyObject *) * (size_t)(ntags > 0 ? ntags : 1)); /* borrowed */
        if (got == NULL) { PyErr_NoMemory(); goto fail; }
        for (Py_ssize_t j = 0; j < ntags; j++) {
            PyObject *pair = PyList_GET_ITEM(tags, j);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(pair, 1))) {
                PyErr_SetString(PyExc_TypeError, "levels: tags must be (tag, key) pairs with a str key");
                goto fail;
            }
            got[j] = PyDict_GetItemWithError(elements, PyTuple_GET_ITEM(pair, 0));
            if (got[j] == NULL && PyErr_Occurred()) goto fail;
        }
        int err = 0;
        PyObject *hit = i < LEVEL_CACHE ? cache_hit((int)i, got, ntags, &err) : NULL;
        if (err) goto fail;
        if (hit != NULL) {
            if (PyDict_SetItem(result, level, hit) < 0) goto fail;
            continue;
        }
        PyObject *out = level_dict(tags, got, ntags, vrs);
        if (out == NULL) goto fail;
        PyObject *view = PyDictProxy_New(out);
        Py_DECREF(out); /* the view holds it, and nothing else does */
        if (view == NULL) goto fail;
        if (PyDict_SetItem(result, level, view) < 0) { Py_DECREF(view); goto fail; }
        if (i < LEVEL_CACHE) cache_store((int)i, got, ntags, view);
        Py_DECREF(view); /* result (and the cache) hold it */
    }
    PyMem_Free(got);
    return result;
fail:
    PyMem_Free(got);
    Py_DECREF(result);
    return NULL;
}

static PyObject *init(PyObject *self, PyObject *exc) {
    if (!PyType_Check(exc) || !PyType_IsSubtype((PyTypeObject *)exc, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "init() takes the NotSimple exception class");
        return NULL;
    }
    Py_XSETREF(NotSimple, Py_NewRef(exc));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(buf, wanted) -> (ts, meta_sop, elements, pixel_offset); see scan.scan_header"},
    {"raw_json", raw_json, METH_VARARGS, "raw_json(vr, value, little_endian=True); see header.raw_json"},
    {"levels", levels, METH_VARARGS,
     "levels(elements, specs, vrs) -> {level: read-only {key: json}}; see header._from_scan"},
    {"init", init, METH_O, "init(NotSimple): the exception raised for objects that need the general parser"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cscan(void) {
    s_vr = PyUnicode_InternFromString("vr");
    s_Value = PyUnicode_InternFromString("Value");
    s_Alphabetic = PyUnicode_InternFromString("Alphabetic");
    if (!s_vr || !s_Value || !s_Alphabetic) return NULL;
    return PyModule_Create(&module);
}
