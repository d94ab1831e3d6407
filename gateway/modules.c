/* The modules this gateway serves: every route of the product is in one of these tables. */
#include "gateway.h"

extern const ch_module_t ch_ops_module;
extern const ch_module_t ch_keys_module;
extern const ch_module_t ch_routes_module;
extern const ch_module_t system_module;
extern const ch_module_t identity_module;
extern const ch_module_t healthcode_module;
extern const ch_module_t onething_module;

const ch_module_t *const ch_modules[] = {
    &ch_ops_module,
    &ch_keys_module,
    &ch_routes_module,
    &system_module,
    &identity_module,
    &healthcode_module,
    &onething_module,
};
const size_t ch_nmodules = sizeof(ch_modules) / sizeof(ch_modules[0]);
