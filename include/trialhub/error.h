/* trialhub's one error enum. Every fallible function in the project returns one of these codes;
 * the enum, th_strerror() and th_errname() are generated from the single TH_ERRNO_MAP list so
 * they cannot drift. Codes are negative, 0 is success. Append only; never renumber. */
#ifndef TRIALHUB_ERROR_H
#define TRIALHUB_ERROR_H

#if defined(__GNUC__)
#define TH_MUST_CHECK __attribute__((warn_unused_result))
#else
#define TH_MUST_CHECK
#endif

/* XX(name, value, message). The values are part of the ABI and of logs: append only. */
#define TH_ERRNO_MAP(XX)                               \
    XX(ENOMEM, -1, "out of memory")                    \
    XX(EINVAL, -2, "invalid argument")                 \
    XX(EOVERLOAD, -3, "overloaded: queue full")        \
    XX(ECANCELED, -4, "operation canceled")            \
    XX(ETIMEDOUT, -5, "deadline exceeded")             \
    XX(ECLOSED, -6, "closed")                          \
    XX(ESHUTDOWN, -7, "shutting down")                 \
    XX(EAGAIN, -8, "resource temporarily unavailable") \
    XX(ESYS, -9, "system call failed")                 \
    XX(EIO, -10, "input/output error")                 \
    XX(ENOTFOUND, -11, "not found")                    \
    XX(EEXIST, -12, "already exists")                  \
    XX(ECONFLICT, -13, "conflict")                     \
    XX(ETOOBIG, -14, "too large")                      \
    XX(EPARSE, -15, "malformed input")                 \
    XX(EUNSUPPORTED, -16, "not supported")             \
    XX(EPERM, -17, "permission denied")

typedef enum th_err {
    TH_OK = 0,
#define TH__ERR_ENUM(name, value, msg) TH_##name = (value),
    TH_ERRNO_MAP(TH__ERR_ENUM)
#undef TH__ERR_ENUM
} th_err;

/* Returns a static, human-readable message for code. Unknown codes give "unknown error".
 * Thread-safe. */
const char *th_strerror(int code);

/* Returns the static symbolic name of code ("TH_EOVERLOAD", "TH_OK"), or "TH_UNKNOWN".
 * Thread-safe. */
const char *th_errname(int code);

#endif
