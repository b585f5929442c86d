/* Messages and names for the error codes, generated from TH_ERRNO_MAP. */
#include "trialhub/error.h"

const char *th_strerror(int code)
{
    switch (code) {
    case TH_OK:
        return "success";
#define TH__ERR_MSG(name, value, msg) \
    case TH_##name:                   \
        return msg;
        TH_ERRNO_MAP(TH__ERR_MSG)
#undef TH__ERR_MSG
    default:
        return "unknown error";
    }
}

const char *th_errname(int code)
{
    switch (code) {
    case TH_OK:
        return "TH_OK";
#define TH__ERR_NAME(name, value, msg) \
    case TH_##name:                    \
        return "TH_" #name;
        TH_ERRNO_MAP(TH__ERR_NAME)
#undef TH__ERR_NAME
    default:
        return "TH_UNKNOWN";
    }
}
