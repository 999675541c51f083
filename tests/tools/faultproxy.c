/* faultproxy.c: a TCP proxy that breaks the network on command, for tests
 * (this kernel has no sch_netem; ../shared/reference/reliability.md).
 *
 *   faultproxy LISTEN_PORT TARGET_PORT CONTROL_SOCKET
 *
 * Forwards every connection to 127.0.0.1:LISTEN_PORT to
 * 127.0.0.1:TARGET_PORT.  One command per line on the unix socket
 * CONTROL_SOCKET changes what happens to every connection, open or new;
 * the reply is one line, "OK ..." or "ERR ...":
 *
 *   pass             forward as it comes (the start)
 *   delay MS         hold each chunk MS milliseconds before forwarding it
 *   throttle BPS     forward at most BPS bytes per second (both ways
 *                    together)
 *   cut N            after N more bytes from clients, close every open
 *                    connection (FIN both ways)
 *   rst N            the same with a reset (RST) instead
 *   lose N           after N more bytes from clients, close every open
 *                    connection at the server's next bytes, dropping
 *                    them: the request arrived, its answer is lost, and
 *                    the client sends it again (a duplicate delivery; a
 *                    byte-level duplicate is only a TLS error)
 *   hang             stop forwarding; keep the connections open
 *   refuse           reset new connections at once
 *   stats            "OK conns C up U down D cuts K"
 *
 * Single-threaded, poll()-based; built for loopback tests, not for speed.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 64
#define BUF_BYTES 65536

enum mode {
    M_PASS, M_DELAY, M_THROTTLE, M_CUT, M_RST, M_LOSE, M_HANG, M_REFUSE
};

struct dir {           /* one direction of a connection */
    int from, to;
    char buf[BUF_BYTES];
    size_t len, off;   /* bytes held, bytes of them already sent */
    uint64_t ready_ms; /* when the held bytes may go (delay) */
    bool eof;          /* from ended; to is shut once the rest is sent */
};

struct conn {
    bool used;
    struct dir up, down; /* client -> server, server -> client */
};

static struct conn conns[MAX_CONNS];
static enum mode mode = M_PASS;
static uint64_t arg;            /* MS, BPS or N of the mode */
static uint64_t nconns, bytes_up, bytes_down, cuts;
static bool lose_armed; /* lose: the next server bytes are dropped */
static double tokens;           /* throttle: bytes allowed now */
static uint64_t last_ms;

static uint64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int
listen_tcp(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0) {
        perror("faultproxy: listen");
        exit(1);
    }
    return fd;
}

static int
connect_tcp(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Close a socket with a reset: SO_LINGER 0. */
static void
close_rst(int fd)
{
    struct linger l = { .l_onoff = 1, .l_linger = 0 };
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

static void
drop(struct conn *c, bool rst)
{
    if (rst) {
        close_rst(c->up.from);
        close_rst(c->up.to);
    } else {
        close(c->up.from);
        close(c->up.to);
    }
    c->used = false;
}

static void
drop_all(bool rst)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (conns[i].used)
            drop(&conns[i], rst);
    cuts++;
}

/* Read what this direction may take now; false if the connection ended. */
static bool
pull(struct dir *d, bool up)
{
    if (d->len > 0 || d->eof)
        return true;
    size_t want = sizeof d->buf;
    if (mode == M_THROTTLE) {
        if (tokens < 1)
            return true;
        if (want > tokens)
            want = (size_t)tokens;
    }
    ssize_t n = read(d->from, d->buf, want);
    if (n == 0) {
        d->eof = true; /* d->len is 0: nothing is left to send */
        shutdown(d->to, SHUT_WR);
        return true;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR)
        return false;
    if (n < 0)
        return true;
    if (mode == M_THROTTLE)
        tokens -= (double)n;
    d->len = (size_t)n;
    d->off = 0;
    d->ready_ms = now_ms() + (mode == M_DELAY ? arg : 0);
    if (!up && mode == M_LOSE && lose_armed) {
        drop_all(false); /* the answer goes with the connections */
        mode = M_PASS;
        lose_armed = false;
        return true;
    }
    if (up) {
        bytes_up += (uint64_t)n;
        if (mode == M_LOSE && !lose_armed) {
            if ((uint64_t)n >= arg)
                lose_armed = true;
            else
                arg -= (uint64_t)n;
        }
        if ((mode == M_CUT || mode == M_RST)) {
            if ((uint64_t)n >= arg) {
                drop_all(mode == M_RST);
                mode = M_PASS; /* one cut per command */
                return true;
            }
            arg -= (uint64_t)n;
        }
    } else {
        bytes_down += (uint64_t)n;
    }
    return true;
}

static bool
push(struct dir *d)
{
    if (d->len == 0 || now_ms() < d->ready_ms)
        return true;
    ssize_t n = write(d->to, d->buf + d->off, d->len - d->off);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR;
    d->off += (size_t)n;
    if (d->off == d->len)
        d->len = d->off = 0;
    return true;
}

static void
control(int fd)
{
    char line[128], reply[160];
    ssize_t n = read(fd, line, sizeof line - 1);
    if (n <= 0)
        return;
    line[n] = '\0';
    line[strcspn(line, "\r\n")] = '\0';
    char word[16] = "";
    unsigned long long v = 0;
    int k = sscanf(line, "%15s %llu", word, &v);
    snprintf(reply, sizeof reply, "OK\n");
    if (k >= 1 && strcmp(word, "pass") == 0)
        mode = M_PASS;
    else if (k == 2 && strcmp(word, "delay") == 0)
        mode = M_DELAY, arg = v;
    else if (k == 2 && strcmp(word, "throttle") == 0 && v > 0)
        mode = M_THROTTLE, arg = v, tokens = 0;
    else if (k == 2 && strcmp(word, "cut") == 0)
        mode = M_CUT, arg = v;
    else if (k == 2 && strcmp(word, "rst") == 0)
        mode = M_RST, arg = v;
    else if (k == 2 && strcmp(word, "lose") == 0)
        mode = M_LOSE, arg = v, lose_armed = false;
    else if (k >= 1 && strcmp(word, "hang") == 0)
        mode = M_HANG;
    else if (k >= 1 && strcmp(word, "refuse") == 0)
        mode = M_REFUSE;
    else if (k >= 1 && strcmp(word, "stats") == 0)
        snprintf(reply, sizeof reply,
                 "OK conns %llu up %llu down %llu cuts %llu\n",
                 (unsigned long long)nconns, (unsigned long long)bytes_up,
                 (unsigned long long)bytes_down, (unsigned long long)cuts);
    else
        snprintf(reply, sizeof reply, "ERR unknown command: %.100s\n", line);
    if (write(fd, reply, strlen(reply)) < 0) {
        /* the client went away */
    }
}

int
main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: faultproxy LISTEN_PORT TARGET_PORT "
                        "CONTROL_SOCKET\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int target = atoi(argv[2]);
    int lfd = listen_tcp(atoi(argv[1]));
    int cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    snprintf(sun.sun_path, sizeof sun.sun_path, "%s", argv[3]);
    unlink(argv[3]);
    if (bind(cfd, (struct sockaddr *)&sun, sizeof sun) < 0 ||
        listen(cfd, 8) < 0) {
        perror("faultproxy: control socket");
        return 1;
    }
    last_ms = now_ms();
    for (;;) {
        struct pollfd p[2 + 2 * MAX_CONNS];
        int np = 0;
        p[np++] = (struct pollfd){ .fd = lfd, .events = POLLIN };
        p[np++] = (struct pollfd){ .fd = cfd, .events = POLLIN };
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (!c->used)
                continue;
            bool go = mode != M_HANG;
            short in_up = go && c->up.len == 0 ? POLLIN : 0;
            short in_dn = go && c->down.len == 0 ? POLLIN : 0;
            short out_up = go && c->up.len ? POLLOUT : 0;
            short out_dn = go && c->down.len ? POLLOUT : 0;
            p[np++] = (struct pollfd){ .fd = c->up.from,
                                       .events = (short)(in_up | out_dn) };
            p[np++] = (struct pollfd){ .fd = c->up.to,
                                       .events = (short)(in_dn | out_up) };
        }
        /* Wake often enough for delays and the throttle's refill. */
        if (poll(p, (nfds_t)np, 20) < 0 && errno != EINTR)
            return 1;
        uint64_t t = now_ms();
        if (mode == M_THROTTLE) {
            tokens += (double)arg * (double)(t - last_ms) / 1000.0;
            if (tokens > (double)arg / 10 + BUF_BYTES)
                tokens = (double)arg / 10 + BUF_BYTES;
        }
        last_ms = t;
        if (p[1].revents & POLLIN) {
            int c = accept4(cfd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                control(c);
                close(c);
            }
        }
        if (p[0].revents & POLLIN) {
            int a = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            int slot = -1;
            for (int i = 0; i < MAX_CONNS && slot < 0; i++)
                if (!conns[i].used)
                    slot = i;
            int s = a >= 0 && mode != M_REFUSE && slot >= 0
                        ? connect_tcp(target) : -1;
            if (s < 0) {
                if (a >= 0)
                    close_rst(a);
            } else {
                fcntl(s, F_SETFL, O_NONBLOCK);
                struct conn *c = &conns[slot];
                memset(c, 0, sizeof *c);
                c->used = true;
                c->up.from = a, c->up.to = s;
                c->down.from = s, c->down.to = a;
                nconns++;
            }
        }
        if (mode == M_HANG)
            continue;
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *c = &conns[i];
            if (!c->used)
                continue;
            bool ok = pull(&c->up, true);
            if (!c->used)
                continue; /* cut */
            ok = ok && pull(&c->down, false) && push(&c->up) &&
                 push(&c->down);
            if (!ok || (c->up.eof && c->down.eof))
                drop(c, false);
        }
    }
}
