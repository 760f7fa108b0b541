#include "sl_common.h"

static _Thread_local struct sl_error_detail last_error;

const struct sl_error_detail *sl_last_error(void) { return &last_error; }

int sl_abi_version(void) { return SL_ABI_VERSION; }

int sl_fail(int err, int reason, uint64_t index, uint64_t value)
{
    last_error.reason = reason;
    last_error.index = index;
    last_error.value = value;
    return -err;
}
