/* The FHIR module's own strict JSON reader for request bodies: a drop-in for jansson's
 * json_loadb(JSON_REJECT_DUPLICATES) that builds the same jansson tree faster. Used by qr.c on
 * the POST /fhir/QuestionnaireResponse path; see json_parse.c for why it exists. */
#ifndef TRIALHUB_FHIR_JSON_INT_H
#define TRIALHUB_FHIR_JSON_INT_H

#include <stddef.h>

#include "trialhub/fhir.h"

/* jansson's JSON_PARSER_MAX_DEPTH: the root is at depth 1, a value deeper than this is an
 * error ("maximum parsing depth reached"), never a stack overflow. */
#define TH__JSON_MAX_DEPTH 2048

/* Parses data (len bytes, need not be NUL-terminated; not retained) exactly as jansson 2.14's
 * json_loadb(data, len, JSON_REJECT_DUPLICATES, &err) would: the same inputs are accepted,
 * giving a json_equal() tree with object members in the same order, and a rejected input gets
 * jansson's line, column (in characters) and byte position. The root must be an object or an
 * array; duplicate keys, invalid UTF-8, lone surrogates, \u0000, integers outside json_int_t and
 * reals that overflow a double are errors, as is anything but whitespace after the root.
 * Returns 0 with *out a new reference the caller must json_decref(); TH_EPARSE with *perr
 * filled when perr is not NULL (its message is fixed text and never quotes the input); or
 * TH_ENOMEM. *out is untouched on error. Thread-safe: no shared state. */
TH_MUST_CHECK int th__json_parse(const char *data, size_t len, json_t **out,
                                 th_fhir_parse_error *perr);

#endif
