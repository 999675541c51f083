/* tap.h: a tiny TAP producer for unit tests (header-only).
 *
 *   plan_no_plan();  ok(cond, "name %d", i);  is_int(a, b, "name");
 *   return done_testing();
 */
#ifndef VR_TAP_H
#define VR_TAP_H

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int tap_n, tap_failed;

static inline void
plan_no_plan(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
}

__attribute__((format(printf, 2, 3))) static inline int
ok(int cond, const char *fmt, ...)
{
    va_list ap;
    tap_n++;
    printf("%s %d - ", cond ? "ok" : "not ok", tap_n);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    if (!cond)
        tap_failed++;
    return cond;
}

#define is_int(got, want, ...)                                                 \
    do {                                                                       \
        long long tap_g_ = (long long)(got), tap_w_ = (long long)(want);      \
        if (!ok(tap_g_ == tap_w_, __VA_ARGS__))                                \
            printf("#   got %lld, want %lld (%s:%d)\n", tap_g_, tap_w_,       \
                   __FILE__, __LINE__);                                        \
    } while (0)

#define is_str(got, want, ...)                                                 \
    do {                                                                       \
        const char *tap_g_ = (got), *tap_w_ = (want);                          \
        if (!ok(tap_g_ && tap_w_ && strcmp(tap_g_, tap_w_) == 0, __VA_ARGS__)) \
            printf("#   got \"%s\", want \"%s\" (%s:%d)\n",                    \
                   tap_g_ ? tap_g_ : "(null)", tap_w_ ? tap_w_ : "(null)",     \
                   __FILE__, __LINE__);                                        \
    } while (0)

static inline void
diag(const char *msg)
{
    printf("# %s\n", msg);
}

static inline int
done_testing(void)
{
    printf("1..%d\n", tap_n);
    return tap_failed ? 1 : 0;
}

#endif
