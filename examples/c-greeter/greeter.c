// greeter-c: a Switchboard plugin written in C.
//
// It answers each `greeting.requested` event, whose data is JSON with a `name`,
// with one `greeting.sent` event: {"greeting":"Hello, <name>!"}. It ignores every
// other kind. A `greeting.requested` event without a name is rejected (it goes to
// the dead-letter queue with the reason). The greeting word comes from the
// plugin's `greeting` configuration value in router.toml, "Hello" by default.
//
// handler.h and handler.c are generated from the WIT world by
// `wit-bindgen c wit --world handler` (see the Makefile).
//
// Ownership, as the generated bindings define it:
// - `handle` owns the event it is given: it frees it (handler_event_free).
// - What `handle` returns (the outputs, or the failure's message) must be heap
//   memory from malloc: the bindings free it after the host has copied it.
//   Never return a string literal (handler_string_set) there: duplicate it.
// - A value an import returns (config get) is owned by the caller: free it.
// - Arguments passed to an import stay owned by the caller.

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "handler.h"

// ---------------------------------------------------------------------------
// A growable byte buffer (malloc'd, so it can be handed to the host).

typedef struct {
  uint8_t *ptr;
  size_t len;
  size_t cap;
} buf_t;

static void buf_reserve(buf_t *b, size_t more) {
  if (b->len + more <= b->cap) return;
  size_t cap = b->cap ? b->cap * 2 : 64;
  while (cap < b->len + more) cap *= 2;
  uint8_t *ptr = realloc(b->ptr, cap);
  if (!ptr) abort();  // out of memory: trap, the host retries the event
  b->ptr = ptr;
  b->cap = cap;
}

static void buf_push(buf_t *b, uint8_t byte) {
  buf_reserve(b, 1);
  b->ptr[b->len++] = byte;
}

static void buf_append(buf_t *b, const void *bytes, size_t len) {
  if (len == 0) return;
  buf_reserve(b, len);
  memcpy(b->ptr + b->len, bytes, len);
  b->len += len;
}

static void buf_append_cstr(buf_t *b, const char *s) { buf_append(b, s, strlen(s)); }

static void buf_free(buf_t *b) {
  free(b->ptr);
  *b = (buf_t){0};
}

// Hands the buffer over as a WIT string / list<u8>; the buffer is left empty.
static handler_string_t buf_take_string(buf_t *b) {
  handler_string_t s = {b->ptr, b->len};
  if (b->len == 0) {  // the bindings only free non-empty strings
    free(b->ptr);
    s.ptr = NULL;
  }
  *b = (buf_t){0};
  return s;
}

// ---------------------------------------------------------------------------
// Just enough JSON: validate the whole document (RFC 8259) and pull out the
// top-level "name" member, decoded, if it is a string.

typedef struct {
  const uint8_t *p;
  const uint8_t *end;
  int depth;
} parser_t;

enum { MAX_DEPTH = 128 };  // bounded recursion: the wasm stack is small

static bool utf8_valid(const uint8_t *s, size_t len) {
  size_t i = 0;
  while (i < len) {
    uint8_t c = s[i];
    size_t n;
    uint32_t cp;
    if (c < 0x80) { i++; continue; }
    else if (c >= 0xC2 && c <= 0xDF) { n = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 3; cp = c & 0x07; }
    else return false;
    if (len - i <= n) return false;
    for (size_t k = 1; k <= n; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n + 1;
  }
  return true;
}

static void skip_ws(parser_t *ps) {
  while (ps->p < ps->end &&
         (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ps->p++;
}

static bool expect_literal(parser_t *ps, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, lit, n) != 0) return false;
  ps->p += n;
  return true;
}

static int hex4(parser_t *ps) {
  if (ps->end - ps->p < 4) return -1;
  int v = 0;
  for (int i = 0; i < 4; i++) {
    uint8_t c = *ps->p++;
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else return -1;
  }
  return v;
}

static void put_utf8(buf_t *out, uint32_t cp) {
  if (cp < 0x80) {
    buf_push(out, (uint8_t)cp);
  } else if (cp < 0x800) {
    buf_push(out, 0xC0 | (cp >> 6));
    buf_push(out, 0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    buf_push(out, 0xE0 | (cp >> 12));
    buf_push(out, 0x80 | ((cp >> 6) & 0x3F));
    buf_push(out, 0x80 | (cp & 0x3F));
  } else {
    buf_push(out, 0xF0 | (cp >> 18));
    buf_push(out, 0x80 | ((cp >> 12) & 0x3F));
    buf_push(out, 0x80 | ((cp >> 6) & 0x3F));
    buf_push(out, 0x80 | (cp & 0x3F));
  }
}

// Parses a string at ps->p (on the opening quote); decodes it into `out` when
// `out` is not NULL. The input is already known to be valid UTF-8.
static bool parse_string(parser_t *ps, buf_t *out) {
  if (ps->p >= ps->end || *ps->p != '"') return false;
  ps->p++;
  while (ps->p < ps->end) {
    uint8_t c = *ps->p++;
    if (c == '"') return true;
    if (c < 0x20) return false;  // control characters must be escaped
    if (c != '\\') {
      if (out) buf_push(out, c);
      continue;
    }
    if (ps->p >= ps->end) return false;
    uint8_t e = *ps->p++;
    uint32_t cp;
    switch (e) {
      case '"': cp = '"'; break;
      case '\\': cp = '\\'; break;
      case '/': cp = '/'; break;
      case 'b': cp = '\b'; break;
      case 'f': cp = '\f'; break;
      case 'n': cp = '\n'; break;
      case 'r': cp = '\r'; break;
      case 't': cp = '\t'; break;
      case 'u': {
        int hi = hex4(ps);
        if (hi < 0) return false;
        cp = (uint32_t)hi;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return false;  // lone low surrogate
        if (cp >= 0xD800 && cp <= 0xDBFF) {              // needs its low half
          if (!expect_literal(ps, "\\u")) return false;
          int lo = hex4(ps);
          if (lo < 0xDC00 || lo > 0xDFFF) return false;
          cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
        }
        break;
      }
      default: return false;
    }
    if (out) put_utf8(out, cp);
  }
  return false;  // unterminated
}

static bool parse_digits(parser_t *ps) {
  const uint8_t *start = ps->p;
  while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  return ps->p > start;
}

static bool parse_number(parser_t *ps) {
  if (ps->p < ps->end && *ps->p == '-') ps->p++;
  if (ps->p < ps->end && *ps->p == '0') ps->p++;
  else if (!parse_digits(ps)) return false;
  if (ps->p < ps->end && *ps->p == '.') {
    ps->p++;
    if (!parse_digits(ps)) return false;
  }
  if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
    ps->p++;
    if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
    if (!parse_digits(ps)) return false;
  }
  return true;
}

// Parses any value. When `name` is not NULL and the value is an object, its
// member "name" (the last one, if repeated), when a string, is decoded into
// *name and *found is set.
static bool parse_value(parser_t *ps, buf_t *name, bool *found) {
  skip_ws(ps);
  if (ps->p >= ps->end) return false;
  switch (*ps->p) {
    case '"': return parse_string(ps, NULL);
    case 't': return expect_literal(ps, "true");
    case 'f': return expect_literal(ps, "false");
    case 'n': return expect_literal(ps, "null");
    case '[': {
      if (++ps->depth > MAX_DEPTH) return false;
      ps->p++;
      skip_ws(ps);
      if (ps->p < ps->end && *ps->p == ']') { ps->p++; ps->depth--; return true; }
      for (;;) {
        if (!parse_value(ps, NULL, NULL)) return false;
        skip_ws(ps);
        if (ps->p >= ps->end) return false;
        uint8_t c = *ps->p++;
        if (c == ']') { ps->depth--; return true; }
        if (c != ',') return false;
      }
    }
    case '{': {
      if (++ps->depth > MAX_DEPTH) return false;
      ps->p++;
      skip_ws(ps);
      if (ps->p < ps->end && *ps->p == '}') { ps->p++; ps->depth--; return true; }
      buf_t key = {0};
      for (;;) {
        skip_ws(ps);
        key.len = 0;
        if (!parse_string(ps, name ? &key : NULL)) break;
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p++ != ':') break;
        skip_ws(ps);
        bool is_name = name && key.len == 4 && memcmp(key.ptr, "name", 4) == 0;
        if (is_name && ps->p < ps->end && *ps->p == '"') {
          name->len = 0;
          if (!parse_string(ps, name)) break;
          *found = true;
        } else {
          if (is_name) *found = false;  // a later non-string "name" wins
          if (!parse_value(ps, NULL, NULL)) break;
        }
        skip_ws(ps);
        if (ps->p >= ps->end) break;
        uint8_t c = *ps->p++;
        if (c == '}') { buf_free(&key); ps->depth--; return true; }
        if (c != ',') break;
      }
      buf_free(&key);
      return false;
    }
    default: return parse_number(ps);
  }
}

// 1: `data` is JSON with a string member "name" (decoded into *name);
// 0: it is JSON without one; -1: it is not JSON.
static int find_name(const uint8_t *data, size_t len, buf_t *name) {
  if (!utf8_valid(data, len)) return -1;
  parser_t ps = {data, data + len, 0};
  bool found = false;
  if (!parse_value(&ps, name, &found)) return -1;
  skip_ws(&ps);
  if (ps.p != ps.end) return -1;  // trailing garbage
  return found ? 1 : 0;
}

// Appends `s` as a JSON string literal, quotes included.
static void json_quote(buf_t *out, const uint8_t *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  buf_push(out, '"');
  for (size_t i = 0; i < len; i++) {
    uint8_t c = s[i];
    switch (c) {
      case '"': buf_append_cstr(out, "\\\""); break;
      case '\\': buf_append_cstr(out, "\\\\"); break;
      case '\b': buf_append_cstr(out, "\\b"); break;
      case '\f': buf_append_cstr(out, "\\f"); break;
      case '\n': buf_append_cstr(out, "\\n"); break;
      case '\r': buf_append_cstr(out, "\\r"); break;
      case '\t': buf_append_cstr(out, "\\t"); break;
      default:
        if (c < 0x20) {
          char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xF]};
          buf_append(out, esc, sizeof esc);
        } else {
          buf_push(out, c);  // UTF-8 passes through unchanged
        }
    }
  }
  buf_push(out, '"');
}

// ---------------------------------------------------------------------------
// The handler.

static bool string_is(const handler_string_t *s, const char *lit) {
  size_t n = strlen(lit);
  return s->len == n && memcmp(s->ptr, lit, n) == 0;
}

// Sets *err to a permanent failure "event <id>: <why>".
static void reject(handler_failure_t *err, const handler_event_t *event, const char *why) {
  buf_t msg = {0};
  buf_append_cstr(&msg, "event ");
  buf_append(&msg, event->id.ptr, event->id.len);
  buf_append_cstr(&msg, ": ");
  buf_append_cstr(&msg, why);
  err->tag = SWITCHBOARD_PLUGIN_TYPES_FAILURE_REJECT;
  err->val.reject = buf_take_string(&msg);
}

bool exports_handler_handle(handler_event_t *event, handler_list_output_t *ret,
                            handler_failure_t *err) {
  bool ok = true;
  *ret = (handler_list_output_t){NULL, 0};
  buf_t name = {0};

  if (!string_is(&event->kind, "greeting.requested")) goto done;  // not ours

  int found = find_name(event->data.ptr, event->data.len, &name);
  if (found < 0) {
    reject(err, event, "data is not JSON");
    ok = false;
    goto done;
  }
  if (found == 0 || name.len == 0) {
    reject(err, event, "no name to greet");
    ok = false;
    goto done;
  }

  // The greeting word: config value `greeting`, "Hello" when unset or empty.
  handler_string_t key;
  handler_string_set(&key, "greeting");  // borrowed: import arguments stay ours
  handler_string_t word;
  bool have_word = switchboard_plugin_config_get(&key, &word);
  if (have_word && word.len == 0) {
    handler_string_free(&word);
    have_word = false;
  }

  buf_t line = {0};
  buf_append_cstr(&line, "greeting ");
  buf_append(&line, name.ptr, name.len);
  handler_string_t message = {line.ptr, line.len};
  switchboard_plugin_logging_log(SWITCHBOARD_PLUGIN_LOGGING_LEVEL_INFO, &message);
  buf_free(&line);

  // {"greeting":"<word>, <name>!"}
  buf_t text = {0};
  if (have_word) buf_append(&text, word.ptr, word.len);
  else buf_append_cstr(&text, "Hello");
  buf_append_cstr(&text, ", ");
  buf_append(&text, name.ptr, name.len);
  buf_push(&text, '!');
  buf_t data = {0};
  buf_append_cstr(&data, "{\"greeting\":");
  json_quote(&data, text.ptr, text.len);
  buf_push(&data, '}');
  buf_free(&text);
  if (have_word) handler_string_free(&word);

  // One output; everything in it is malloc'd, the bindings free it all.
  handler_output_t *out = calloc(1, sizeof *out);
  if (!out) abort();
  handler_string_dup(&out->kind, "greeting.sent");
  out->content_type.is_some = true;
  handler_string_dup(&out->content_type.val, "application/json");
  handler_string_t bytes = buf_take_string(&data);
  out->data = (handler_list_u8_t){bytes.ptr, bytes.len};
  out->exchange.is_some = false;                        // the configured one
  out->headers = (handler_list_tuple2_string_string_t){NULL, 0};
  *ret = (handler_list_output_t){out, 1};

done:
  buf_free(&name);
  handler_event_free(event);  // the event is ours to free
  return ok;
}
