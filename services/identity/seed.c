/* PLACEHOLDER until its author lands the real file: every route answers 500. */
#include "identity.h"

int identity_cmd_seed(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}

int identity_cmd_import_registry(const ch_config_t *config, int argc, char **argv)
{
    return 1;
}
