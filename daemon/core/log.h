/* log.h: the daemon's log — one line per message on stderr, prefixed with
 * the level and the component (log.c). */
#ifndef VR_LOG_H
#define VR_LOG_H

#include "vr.h"

/* Write one line "LEVEL COMPONENT: message" if level <= log_level. */
void log_msg(int level, const char *component, const char *fmt, ...)
    VR_PRINTF(3, 4);
#define LOG_ERROR 0
#define LOG_WARN  1
#define LOG_INFO  2
#define LOG_DEBUG 3
extern int log_level;
#define log_error(c, ...) log_msg(LOG_ERROR, c, __VA_ARGS__)
#define log_warn(c, ...)  log_msg(LOG_WARN, c, __VA_ARGS__)
#define log_info(c, ...)  log_msg(LOG_INFO, c, __VA_ARGS__)
#define log_debug(c, ...)                                                      \
    do {                                                                       \
        if (unlikely(log_level >= LOG_DEBUG))                                  \
            log_msg(LOG_DEBUG, c, __VA_ARGS__);                                \
    } while (0)

#endif
