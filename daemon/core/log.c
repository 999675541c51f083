/* log.c: the daemon's log: one line per message on stderr, "TIME
 * vmreplicad LEVEL: COMPONENT: message", with messages above log_level
 * dropped.  Logging never changes errno. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

#include "log.h"

int log_level = LOG_INFO;

void
log_msg(int level, const char *component, const char *fmt, ...)
{
    static const char *names[] = { "error", "warning", "info", "debug" };
    if (level > log_level)
        return;
    int saved = errno;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char ts[32];
    vr_rfc3339(vr_wall_ms(), ts);
    fprintf(stderr, "%s vmreplicad %s: %s: %s\n", ts, names[level], component,
            msg);
    errno = saved;
}
