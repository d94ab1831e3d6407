/* PLACEHOLDER until the token work lands: no token is valid yet. */
#include "gateway.h"
#include "cityhall/auth.h"

int ch_auth_init(const ch_config_t *config, char *err, size_t errlen)
{
    return 0;
}

void ch_auth_thread_init(ch_thread_t *thread)
{
}

int ch_auth_verify(ch_thread_t *thread, const char *token, size_t len, h2o_mem_pool_t *pool, ch_principal_t *principal)
{
    return CH_EINVAL;
}
