/* plugin.h: which nbdkit plugin vmreplicad serves disks with, and whether
 * nbdkit can load it. */
#ifndef VR_PROC_PLUGIN_H
#define VR_PROC_PLUGIN_H

#include "vr.h"

/* $VMREPLICA_PLUGIN, this build tree's plugin when vmreplicad runs from a
 * meson build tree, or the installed one in PLUGINDIR. */
const char *plugin_path(void);
/* Where plugin_path() found the plugin: "from VMREPLICA_PLUGIN", "from
 * this build tree" or "the installed path". */
const char *plugin_origin(void);
/* Whether nbdkit loads the plugin (nbdkit --dump-plugin, which also names
 * it vmreplica): 0, or a negative errno with a message that says what
 * failed and how to fix it. */
int plugin_check(void) VR_WUR;

#endif
