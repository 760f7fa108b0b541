#include "sl_common.h"

static _Thread_local struct sl_error_detail last_error;

const struct sl_error_detail *sl_last_error(void) { return &last_error; }

int sl_abi_version(void) { return SL_ABI_VERSION; }

int sl_fail_record(int err, const struct sl_error_detail *record)
{
    last_error = *record;
    return -err;
}

int sl_fail_access(int err, int reason, uint32_t access, uint64_t value, uint64_t limit)
{
    struct sl_error_detail record = {reason, access, 0, value, limit};
    return sl_fail_record(err, &record);
}

int sl_fail_limit(int err, int reason, uint64_t element, uint64_t value, uint64_t limit)
{
    struct sl_error_detail record = {reason, 0, element, value, limit};
    return sl_fail_record(err, &record);
}

int sl_fail(int err, int reason, uint64_t element, uint64_t value)
{
    return sl_fail_limit(err, reason, element, value, 0);
}
