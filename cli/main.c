/* main.c: the vmreplica command-line client — global options, the command
 * table, option parsing, and the management API call (JSON over HTTP/1.1 on
 * the daemon's unix socket, through libcurl).
 *
 * Every command is a thin call of one endpoint of docs/api.md.  Failures
 * print one line "vmreplica: error: MESSAGE" on stderr and exit non-zero
 * (cli.h lists the statuses); usage errors also print the command's usage
 * and exit 2.
 */
#include <curl/curl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "config.h"

#define DEFAULT_SOCKET "/var/lib/vmreplica/api.sock"
#define MAX_RESPONSE   (64u << 20)

/* --- command table ----------------------------------------------------- */

static const struct cli_cmd commands[] = {
    { "auth-entry", "add", cmd_auth_add,
      "--primary PATTERN --storage DIR [--trust-group NAME] [--max-vms N]",
      "on the Replica server: allow a primary (FQDN, or *.FQDN) to "
      "replicate here",
      "  --primary PATTERN  the primary's certificate name; '*' only as the "
      "whole\n"
      "                     first label (*.example.com)\n"
      "  --storage DIR      where its Replica VMs are kept\n"
      "  --trust-group NAME its VMs may move between primaries of the "
      "group\n"
      "  --max-vms N        at most N Replica VMs for the primaries it "
      "admits\n"
      "                     (default 256)\n" },
    { "auth-entry", "list", cmd_auth_list, "", "list authorization entries",
      NULL },
    { "auth-entry", "set", cmd_auth_set,
      "PATTERN [--storage DIR] [--trust-group NAME] [--max-vms N]",
      "change an authorization entry", NULL },
    { "auth-entry", "remove", cmd_auth_remove, "PATTERN",
      "remove an authorization entry (its primary's next request is "
      "refused)", NULL },
    { "server", "show", cmd_server_show, "",
      "show the Replica server settings of this host", NULL },
    { "server", "set", cmd_server_set,
      "[--enable|--disable] [--auth certificate|kerberos|both]\n"
      "        [--certificate-port PORT] [--certificate FILE --key FILE "
      "--ca FILE]\n"
      "        [--crl FILE|--no-crl] [--certificate-store DIR "
      "--certificate-thumbprint HEX]\n"
      "        [--kerberos-port PORT] [--keytab FILE] [--kerberos-encrypt "
      "on|off]\n"
      "        [--hostname FQDN]\n"
      "        [--allow-any|--no-allow-any] [--default-storage DIR]\n"
      "        [--monitoring-interval DURATION]\n"
      "        [--web-listen [ADDR:]PORT|--no-web-listen]\n"
      "        [--hypervisor qemu|libvirt]",
      "change the Replica server settings",
      "  --enable, --disable         accept replication as a Replica server\n"
      "  --auth TYPE                 certificate (HTTPS), kerberos (HTTP) "
      "or both\n"
      "  --certificate-port PORT     HTTPS listener port (default 443)\n"
      "  --kerberos-port PORT        Kerberos listener port (default 80)\n"
      "  --keytab FILE               keys of host/FQDN and HTTP/FQDN\n"
      "  --kerberos-encrypt on|off   refuse Kerberos replication that is "
      "not\n"
      "                              encrypted (default off)\n"
      "  --certificate FILE          this host's certificate (PEM)\n"
      "  --key FILE                  its private key (PEM)\n"
      "  --ca FILE                   CA certificates peers must chain to\n"
      "  --certificate-store DIR     certificates NAME.pem with keys "
      "NAME.key...\n"
      "  --certificate-thumbprint HEX  ...of which use the one with this "
      "SHA-1\n"
      "                              or SHA-256 fingerprint\n"
      "  --crl FILE, --no-crl        revocation list (PEM) of that CA: "
      "revoked\n"
      "                              client certificates are refused\n"
      "  --hostname FQDN             this host's name (default: from the "
      "certificate)\n"
      "  --allow-any, --no-allow-any accept any authenticated primary\n"
      "  --default-storage DIR       where Replica VMs of such primaries go\n"
      "  --monitoring-interval DUR   health window, e.g. 12h, 30m, 3600\n"
      "  --web-listen [ADDR:]PORT    serve /metrics and the dashboard there\n"
      "                              (PORT alone: 127.0.0.1; HTTPS with\n"
      "                              client certificates if this server has\n"
      "                              a certificate, else loopback only)\n"
      "  --no-web-listen             stop serving them (the default)\n"
      "  --hypervisor qemu|libvirt   what runs VMs started here, failed\n"
      "                              over VMs included (default qemu)\n" },
    { "server", "test-connection", cmd_server_test_connection,
      "FQDN[:PORT] --auth certificate|kerberos [--connect-address IP]",
      "check that a Replica server would accept replication from this host",
      "  Connects as replication would (same authentication), and says at\n"
      "  which step it failed: reaching the server, authenticating, or\n"
      "  being accepted (replication enabled, authorization entry).\n" },
    { "server", "firewall", cmd_server_firewall, "enable|disable|show",
      "open the listener ports in nftables (table inet vmreplica)",
      "  enable   create table inet vmreplica: TCP to the running\n"
      "           listeners' ports is marked 0x766d72 and accepted; it\n"
      "           follows 'server set' and is re-created at daemon start\n"
      "  disable  delete the table (the default: the host's firewall is\n"
      "           not touched)\n"
      "  show     the setting, the ports and the table as nft lists it\n"
      "\n"
      "An accept in this table cannot override a drop in another table:\n"
      "if the host's own ruleset drops by default, add\n"
      "'meta mark 0x766d72 accept' to its input chain.\n" },
    { "vm", "create", cmd_vm_create,
      "NAME (--disk FILE | --new-disk SIZE)... [--memory SIZE] [--cpus N]\n"
      "        [--nic NETWORK]... [--kernel FILE [--initrd FILE] "
      "[--append CMDLINE]]\n"
      "       vm create NAME --from-libvirt DOMAIN",
      "create a VM from disk images, new empty disks or a libvirt domain",
      "  --disk FILE       import an image (raw, qcow2, VHDX, VHD, VMDK)\n"
      "  --new-disk SIZE   create an empty sparse disk, e.g. 10G\n"
      "  --memory SIZE     memory, e.g. 512M, 2G (a bare number is MiB)\n"
      "  --cpus N          virtual CPUs\n"
      "  --nic NETWORK     a NIC on none, user, tap:IFNAME or "
      "bridge:BRIDGE\n"
      "  --kernel FILE     boot this Linux kernel directly (QEMU -kernel)\n"
      "  --initrd FILE     with this initial ramdisk\n"
      "  --append CMDLINE  and this kernel command line\n"
      "  --from-libvirt DOMAIN  adopt a shut off libvirt domain: its CPUs,\n"
      "                    memory, NICs and disks (raw files in place, others\n"
      "                    converted); the domain is redefined on the tracked\n"
      "                    exports (docs/libvirt.md)\n" },
    { "vm", "list", cmd_vm_list, "", "list VMs", NULL },
    { "vm", "show", cmd_vm_show, "VM", "show a VM and its disks", NULL },
    { "vm", "start", cmd_vm_start,
      "VM [--hypervisor qemu|libvirt | --no-hypervisor]",
      "serve a VM's disks and start QEMU or a libvirt domain",
      "  --hypervisor qemu|libvirt  run the guest under vmreplica's QEMU or\n"
      "                    as a libvirt domain (default: 'server set\n"
      "                    --hypervisor'; libvirt for an adopted domain)\n"
      "  --no-hypervisor   only serve the disks over NBD (see 'vm show')\n" },
    { "vm", "stop", cmd_vm_stop, "VM [--force]",
      "shut a VM down and stop serving its disks",
      "  --force           kill QEMU at once instead of an ACPI shutdown\n" },
    { "vm", "set-boot", cmd_vm_set_boot,
      "VM [--kernel FILE [--initrd FILE] [--append CMDLINE]]",
      "boot a VM on this server from a kernel (none: from its disk)", NULL },
    { "vm", "set-test-network", cmd_vm_set_test_network, "VM NETWORK",
      "the network a test failover's NICs join (default none)", NULL },
    { "vm", "set-failover-network", cmd_vm_set_failover_network,
      "VM [--nic N] [--ipv4 A/P] [--gateway4 G] [--ipv6 A/P] "
      "[--gateway6 G]\n        [--dns A[,B]] [--network NETWORK] [--clear]",
      "network settings set in the guest (agent) when it fails over", NULL },
    { "vm", "remove", cmd_vm_remove, "VM", "delete a stopped VM and its disks",
      NULL },
    { "replication", "enable", cmd_repl_enable,
      "VM --replica-server FQDN[:PORT] [--connect-address IP]\n"
      "        --auth certificate|kerberos [--kerberos-encrypt on|off]\n"
      "        [--frequency 30s|5m|15m|Ns] [--compression on|off]\n"
      "        [--recovery-history N] [--point-interval DURATION]\n"
      "        [--app-consistent-every K] [--log-budget SIZE]\n"
      "        [--auto-resync on|off] [--resync-window HH:MM-HH:MM]",
      "enable replication of a VM to a Replica server",
      "  --replica-server FQDN[:PORT]  the Replica server (its certificate "
      "name)\n"
      "  --connect-address IP          address to dial instead of resolving "
      "FQDN\n"
      "  --auth certificate|kerberos   HTTPS with X.509, or HTTP with "
      "Kerberos\n"
      "                                (default port 443 or 80)\n"
      "  --kerberos-encrypt on|off     Kerberos: encrypt the data (GSS wrap;"
      "\n"
      "                                it is always signed)\n"
      "  --frequency DURATION          30s, 5m, 15m or any whole seconds >= "
      "1\n"
      "  --compression on|off          zstd compression (default on)\n"
      "  --recovery-history N          hourly recovery points kept on the "
      "Replica\n"
      "                                server besides the latest (default "
      "0)\n"
      "  --point-interval DURATION     the \"hour\" of --recovery-history "
      "(default 1h)\n"
      "  --app-consistent-every K      every K-th hour's point is "
      "application-\n"
      "                                consistent (guest agent fsfreeze; 0: "
      "off)\n"
      "  --log-budget SIZE             fold the unsent log into a region "
      "map past\n"
      "                                SIZE (default half the disks' "
      "size)\n"
      "  --auto-resync on|off          resynchronize by itself when change "
      "tracking\n"
      "                                stops (default on)\n"
      "  --resync-window HH:MM-HH:MM   start an automatic resynchronization "
      "only\n"
      "                                in this daily window, local time "
      "(\"any\":\n"
      "                                any time, the default)\n"
      "\n"
      "Not available yet (SPEC, docs/cmdlets.md): --exclude-disk ID,\n"
      "--bandwidth-limit RATE.\n" },
    { "replication", "set", cmd_repl_set,
      "VM [--frequency DURATION] [--compression on|off] "
      "[--connect-address IP] [--recovery-history N] "
      "[--point-interval DURATION] [--app-consistent-every K] "
      "[--kerberos-encrypt on|off] [--log-budget SIZE] "
      "[--auto-resync on|off] [--resync-window HH:MM-HH:MM|any]",
      "change the replication settings of a VM",
      "  The options mean what they mean for 'replication enable' (see\n"
      "  'vmreplica help replication enable'); the Replica server and the\n"
      "  authentication do not change (remove, then enable again).\n"
      "\n"
      "Not available yet (SPEC, docs/cmdlets.md): --exclude-disk ID,\n"
      "--bandwidth-limit RATE.\n" },
    { "replication", "show", cmd_repl_show, "VM",
      "show the replication of a VM", NULL },
    { "replication", "list", cmd_repl_list,
      "[--state STATE] [--health Normal|Warning|Critical] "
      "[--mode primary|replica|test]",
      "list replicated VMs", NULL },
    { "replication", "measure", cmd_repl_measure, "VM",
      "show replication statistics of a VM", NULL },
    { "replication", "suspend", cmd_repl_suspend, "VM",
      "pause replication (changes keep being tracked)", NULL },
    { "replication", "stop-resync", cmd_repl_stop_resync, "VM",
      "on the primary: stop a resynchronization (running, scheduled or "
      "suspended); the VM needs one until 'replication resume VM --resync'",
      NULL },
    { "replication", "resume", cmd_repl_resume,
      "VM [--resync [--at TIME | --continue]]",
      "resume paused replication",
      "  --resync          change tracking stopped on this primary (a full "
      "log, a host\n"
      "                    crash): compare the regions changed meanwhile "
      "with the\n"
      "                    Replica server's copy and send only what "
      "differs\n"
      "  --at TIME         start it then: +DURATION, HH:MM or YYYY-MM-DD "
      "HH:MM[:SS]\n"
      "                    (local time, at most 7 days ahead); survives a "
      "restart\n"
      "  --continue        go on with a suspended resynchronization from "
      "where it\n"
      "                    stopped\n" },
    { "replication", "remove", cmd_repl_remove, "VM",
      "stop replicating a VM (the Replica server keeps its copy)", NULL },
    { "replication", "reverse", cmd_repl_reverse,
      "VM [--replica-server FQDN[:PORT]] [--connect-address IP]",
      "after a failover: replicate back to the old primary (after an "
      "unplanned one,\n"
      "only the chunks that differ are sent)",
      "  --replica-server FQDN[:PORT]  the old primary's Replica server "
      "listener\n"
      "                                (default: the one it replicated to "
      "before)\n"
      "  --connect-address IP          address to dial instead of resolving "
      "FQDN\n" },
    { "replication", "reset-stats", cmd_repl_reset_stats, "VM",
      "clear a VM's replication statistics (errors, counts, sizes)", NULL },
    { "points", "list", cmd_points_list, "VM",
      "list the recovery points of a Replica VM (on the Replica server)",
      NULL },
    { "failover", "start", cmd_failover_start,
      "VM [--test] [--point ID] [--force]",
      "on the Replica server: start the VM (or \"VM - Test\") from a "
      "recovery point",
      "  --test            a test failover: \"VM - Test\" runs, replication "
      "goes on\n"
      "  --point ID        the recovery point (default: the latest)\n"
      "  --force           fail over although the primary server was in "
      "contact\n"
      "                    within three replication periods\n" },
    { "failover", "stop", cmd_failover_stop, "VM [--test]",
      "cancel a failover or a preparation, or remove \"VM - Test\" "
      "(--test)",
      NULL },
    { "failover", "prepare", cmd_failover_prepare, "VM",
      "on the primary (VM shut down): ship every change and prepare a "
      "planned failover", NULL },
    { "failover", "complete", cmd_failover_complete, "VM [--force]",
      "on the Replica server: commit a failover (the other recovery points "
      "are deleted)",
      "  --force           kill the failed-over guest at once instead of an "
      "ACPI\n"
      "                    shutdown (which waits up to 30 s)\n" },
    { "initial-replication", "start", cmd_initial_start,
      "VM [--at TIME] [--export DIR | --use-existing] [--wait]",
      "send the first full copy of a VM's disks",
      "  --at TIME         start then: HH:MM (today or tomorrow) or RFC "
      "3339, at most\n"
      "                    7 days ahead\n"
      "  --export DIR      write the copy to DIR (external media) instead; "
      "the Replica\n"
      "                    server imports it ('initial-replication "
      "import')\n"
      "  --use-existing    the Replica server holds a copy already (one "
      "'replication\n"
      "                    remove' kept, or a restored backup): compare "
      "chunk hashes\n"
      "                    and send only what differs\n"
      "  --wait            block until done (an export: written), with a "
      "progress bar\n"
      "                    on a terminal\n" },
    { "initial-replication", "stop", cmd_initial_stop, "VM",
      "cancel a scheduled or running initial replication (it waits for a "
      "new start)", NULL },
    { "initial-replication", "import", cmd_initial_import, "VM --from DIR",
      "on the Replica server: load an export, then the primary's changes "
      "flow", NULL },
    { "events", NULL, cmd_events, "[--vm VM] [--follow]",
      "show recent events",
      "  --vm VM           only events of this VM\n"
      "  --follow          then print new events as they come, until "
      "interrupted\n"
      "                    (with --json: one JSON object per line)\n" },
};

/* --- messages and usage ------------------------------------------------ */

static void
verror(const char *fmt, va_list ap)
{
    fputs("vmreplica: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

int
cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verror(fmt, ap);
    va_end(ap);
    return CLI_ERR;
}

void
cli_print_usage(const struct cli_cmd *cmd, FILE *f)
{
    fprintf(f, "usage: vmreplica %s%s%s%s%s\n", cmd->noun,
            cmd->verb ? " " : "", cmd->verb ? cmd->verb : "",
            *cmd->args ? " " : "", cmd->args);
    if (cmd->help)
        fprintf(f, "\n%s", cmd->help);
}

int
cli_usage_error(const struct cli_cmd *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verror(fmt, ap);
    va_end(ap);
    if (cmd)
        cli_print_usage(cmd, stderr);
    return CLI_USAGE;
}

static void
print_overview(FILE *f)
{
    fprintf(f,
            "usage: vmreplica [--connect SOCKET|https://HOST:PORT] [--json] "
            "NOUN VERB [ARGS]\n"
            "\n"
            "Asynchronous replication of QEMU/KVM virtual machines.\n"
            "\n"
            "Global options:\n"
            "  --connect SOCKET  daemon API socket (default "
            "$VMREPLICA_SOCKET,\n"
            "                    else " DEFAULT_SOCKET ")\n"
            "  --json            print the API's JSON instead of tables\n"
            "  --help            this help; 'vmreplica help NOUN [VERB]' for "
            "more\n"
            "  --version         print the version\n"
            "\n"
            "Commands:\n");
    for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
        const struct cli_cmd *c = &commands[i];
        char name[48];
        snprintf(name, sizeof name, "%s%s%s", c->noun, c->verb ? " " : "",
                 c->verb ? c->verb : "");
        fprintf(f, "  %-28s %s\n", name, c->summary);
    }
}

static bool
noun_exists(const char *noun)
{
    for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
        if (strcmp(commands[i].noun, noun) == 0)
            return true;
    }
    return false;
}

static void
print_noun(const char *noun, FILE *f)
{
    for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
        if (strcmp(commands[i].noun, noun) == 0)
            fprintf(f, "usage: vmreplica %s %s%s%s\n", noun,
                    commands[i].verb ? commands[i].verb : "",
                    *commands[i].args ? " " : "", commands[i].args);
    }
}

static const struct cli_cmd *
find_cmd(const char *noun, const char *verb)
{
    for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
        const struct cli_cmd *c = &commands[i];
        if (strcmp(c->noun, noun) != 0)
            continue;
        if (!c->verb || (verb && strcmp(c->verb, verb) == 0))
            return c;
    }
    return NULL;
}

/* --- option parsing ---------------------------------------------------- */

int
cli_parse(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
          const struct cli_opt *opts, const char **pos, unsigned max_pos,
          unsigned *npos)
{
    *npos = 0;
    bool only_pos = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!only_pos && strcmp(a, "--") == 0) {
            only_pos = true;
            continue;
        }
        if (!only_pos && (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)) {
            cli_print_usage(cmd, stdout);
            return -1;
        }
        if (!only_pos && strncmp(a, "--", 2) == 0) {
            const char *name = a + 2;
            const char *eq = strchr(name, '=');
            size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
            if (nlen == 4 && strncmp(name, "json", 4) == 0 && !eq) {
                c->json = true;
                continue;
            }
            const struct cli_opt *o = NULL;
            for (const struct cli_opt *p = opts; p && p->name; p++) {
                if (strlen(p->name) == nlen &&
                    strncmp(p->name, name, nlen) == 0) {
                    o = p;
                    break;
                }
            }
            if (!o)
                return cli_usage_error(cmd, "unknown option '--%.*s'",
                                       (int)nlen, name);
            if (o->kind == CLI_OPT_FLAG) {
                if (eq)
                    return cli_usage_error(cmd, "option '--%s' takes no "
                                           "value", o->name);
                *(bool *)o->dest = true;
                continue;
            }
            const char *val;
            if (eq) {
                val = eq + 1;
            } else if (i + 1 < argc) {
                val = argv[++i];
            } else {
                return cli_usage_error(cmd, "option '--%s' needs a value",
                                       o->name);
            }
            if (!*val)
                return cli_usage_error(cmd, "option '--%s' needs a value",
                                       o->name);
            if (o->kind == CLI_OPT_STR) {
                *(const char **)o->dest = val;
            } else {
                struct cli_list *l = o->dest;
                if (l->n >= ARRAY_SIZE(l->items))
                    return cli_usage_error(cmd, "too many '--%s' options",
                                           o->name);
                l->items[l->n].opt = o->name;
                l->items[l->n].value = val;
                l->n++;
            }
            continue;
        }
        if (!only_pos && a[0] == '-' && a[1] != '\0')
            return cli_usage_error(cmd, "unknown option '%s'", a);
        if (*npos >= max_pos)
            return cli_usage_error(cmd, "unexpected argument '%s'", a);
        pos[(*npos)++] = a;
    }
    return CLI_OK;
}

int
cli_want_args(const struct cli_cmd *cmd, unsigned npos, unsigned n,
              const char *what)
{
    if (npos < n)
        return cli_usage_error(cmd, "missing argument %s", what);
    return CLI_OK;
}

int
cli_parse_args(struct cli *c, const struct cli_cmd *cmd, int argc,
               char **argv, const struct cli_opt *opts, const char **pos,
               unsigned n, const char *what)
{
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, n, &npos);
    if (rc == CLI_OK)
        rc = cli_want_args(cmd, npos, n, what);
    return rc;
}

/* --- API call ---------------------------------------------------------- */

struct buf {
    char *data;
    size_t len;
    bool too_big;
};

static size_t
on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct buf *b = userdata;
    size_t n = size * nmemb;
    if (b->len + n > MAX_RESPONSE) {
        b->too_big = true;
        return 0;
    }
    b->data = xrealloc(b->data, b->len + n + 1);
    memcpy(b->data + b->len, ptr, n);
    b->len += n;
    b->data[b->len] = '\0';
    return n;
}

char *
cli_escape(const char *s)
{
    char *e = curl_easy_escape(NULL, s, 0);
    if (!e)
        abort();
    char *r = xstrdup(e);
    curl_free(e);
    return r;
}

void
cli_print_json(json_object *obj)
{
    if (!obj)
        return;
    puts(json_object_to_json_string_ext(
        obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                 JSON_C_TO_STRING_NOSLASHESCAPE));
}

/* The server's message from an error body, else a generic one; caller
 * frees. */
static char *
error_message(long status, const struct buf *b)
{
    if (b->data) {
        json_object *o = json_tokener_parse(b->data);
        if (o && json_object_is_type(o, json_type_object)) {
            json_object *m;
            if (json_object_object_get_ex(o, "message", &m) &&
                json_object_is_type(m, json_type_string)) {
                char *r = xstrdup(json_object_get_string(m));
                json_object_put(o);
                return r;
            }
        }
        if (o)
            json_object_put(o);
    }
    /* Not our API's error shape: show the first line of the body. */
    char first[160] = "";
    if (b->data) {
        snprintf(first, sizeof first, "%s", b->data);
        first[strcspn(first, "\r\n")] = '\0';
    }
    return xasprintf("server returned HTTP %ld%s%s", status,
                     *first ? ": " : "", first);
}

/* The daemon's socket cannot be reached: say why and what to do about it
 * (start the daemon, point at the right socket, or join its group);
 * CLI_UNREACHABLE. */
static int
connect_error(const struct cli *c, int os_errno, const char *curl_msg)
{
    const char *why = os_errno ? strerror(os_errno) : curl_msg;
    if (os_errno == EACCES || os_errno == EPERM)
        cli_error("cannot connect to %s: %s: run as root or as a member of "
                  "the vmreplica group", c->connect, why);
    else
        cli_error("cannot connect to %s: %s: is vmreplicad running? start it "
                  "(systemctl start vmreplicad), or set VMREPLICA_SOCKET (or "
                  "--connect) to its STATE_DIR/api.sock", c->connect, why);
    return CLI_UNREACHABLE;
}

struct slow {
    const char *note;
    uint64_t start_ms;
    bool shown;
};

static uint64_t
mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* libcurl's progress callback: the slow note, once, when it is due. */
static int
on_progress(void *p, curl_off_t dltotal VR_UNUSED, curl_off_t dlnow VR_UNUSED,
            curl_off_t ultotal VR_UNUSED, curl_off_t ulnow VR_UNUSED)
{
    struct slow *s = p;
    if (!s->shown && mono_ms() >= s->start_ms + CLI_SLOW_NOTE_MS) {
        s->shown = true;
        fprintf(stderr, "vmreplica: %s\n", s->note);
    }
    return 0;
}

int
cli_call(struct cli *c, const char *method, const char *path,
         json_object *body, json_object **out)
{
    *out = NULL;
    if (strncmp(c->connect, "https://", 8) == 0 ||
        strncmp(c->connect, "http://", 7) == 0)
        return cli_error("remote management (%s) is not supported yet; "
                         "connect to the daemon's unix socket", c->connect);

    CURL *h = curl_easy_init();
    if (!h)
        return cli_error("cannot initialize libcurl");
    char errbuf[CURL_ERROR_SIZE] = "";
    struct buf resp = { 0 };
    struct curl_slist *hdrs = NULL;
    CLEANUP_FREE char *url = xasprintf("http://localhost%s", path);
    const char *payload = NULL;
    if (body)
        payload = json_object_to_json_string_ext(
            body, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
    else if (strcmp(method, "GET") != 0 && strcmp(method, "DELETE") != 0)
        payload = "{}";

    hdrs = curl_slist_append(hdrs, "Accept: application/json");
    if (payload)
        hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    hdrs = curl_slist_append(hdrs, "Expect:");
    curl_easy_setopt(h, CURLOPT_UNIX_SOCKET_PATH, c->connect);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 10L);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "vmreplica/" VERSION);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &resp);
    if (payload) {
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, payload);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(payload));
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    struct slow slow = { c->slow_note, mono_ms(), false };
    if (c->slow_note) {
        curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(h, CURLOPT_XFERINFODATA, &slow);
        curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    }

    int rc = CLI_OK;
    CURLcode cr = curl_easy_perform(h);
    long status = 0;
    if (cr != CURLE_OK) {
        long os_errno = 0;
        curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno);
        if (cr == CURLE_COULDNT_CONNECT || cr == CURLE_COULDNT_RESOLVE_HOST)
            rc = connect_error(c, (int)os_errno,
                               *errbuf ? errbuf : curl_easy_strerror(cr));
        else if (resp.too_big)
            rc = cli_error("%s %s: response larger than %u bytes", method,
                           path, MAX_RESPONSE);
        else
            rc = cli_error("%s %s via %s: %s", method, path, c->connect,
                           *errbuf ? errbuf : curl_easy_strerror(cr));
        goto out;
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    if (status >= 400 || status < 200) {
        CLEANUP_FREE char *msg = error_message(status, &resp);
        rc = cli_error("%s", msg);
        if (status == 404)
            rc = CLI_NOTFOUND;
        goto out;
    }
    if (resp.len > 0) {
        enum json_tokener_error jerr;
        json_object *o = json_tokener_parse_verbose(resp.data, &jerr);
        if (!o || !json_object_is_type(o, json_type_object)) {
            if (o)
                json_object_put(o);
            rc = cli_error("%s %s: bad response from the daemon: %s", method,
                           path,
                           o ? "not a JSON object"
                             : json_tokener_error_desc(jerr));
            goto out;
        }
        *out = o;
    }
out:
    free(resp.data);
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(h);
    return rc;
}

/* --- output helpers ---------------------------------------------------- */

static json_object *
get(json_object *o, const char *key)
{
    json_object *v = NULL;
    if (o && json_object_object_get_ex(o, key, &v))
        return v;
    return NULL;
}

bool
cli_has(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    return v && !json_object_is_type(v, json_type_null);
}

const char *
cli_str(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    if (!v || json_object_is_type(v, json_type_null))
        return "";
    return json_object_get_string(v);
}

int64_t
cli_int(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    return v ? json_object_get_int64(v) : 0;
}

double
cli_double(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    return v ? json_object_get_double(v) : 0.0;
}

bool
cli_bool(json_object *o, const char *key)
{
    json_object *v = get(o, key);
    return v ? json_object_get_boolean(v) : false;
}

const char *
cli_fmt_size(uint64_t bytes, char *buf, size_t cap)
{
    static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB" };
    if (bytes < 1024) {
        snprintf(buf, cap, "%" PRIu64 " B", bytes);
        return buf;
    }
    double v = (double)bytes;
    unsigned u = 0;
    v /= 1024;
    while (v >= 1024 && u + 1 < ARRAY_SIZE(units)) {
        v /= 1024;
        u++;
    }
    if (v == (double)(uint64_t)v)
        snprintf(buf, cap, "%" PRIu64 " %s", (uint64_t)v, units[u]);
    else
        snprintf(buf, cap, "%.1f %s", v, units[u]);
    return buf;
}

const char *
cli_fmt_duration(uint64_t secs, char *buf, size_t cap)
{
    if (secs > 0 && secs % 3600 == 0)
        snprintf(buf, cap, "%" PRIu64 "h", secs / 3600);
    else if (secs > 0 && secs % 60 == 0)
        snprintf(buf, cap, "%" PRIu64 "m", secs / 60);
    else
        snprintf(buf, cap, "%" PRIu64 "s", secs);
    return buf;
}

void
cli_kv(const char *key, const char *fmt, ...)
{
    char k[64];
    snprintf(k, sizeof k, "%s:", key);
    printf("%-26s ", k);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

struct cli_table {
    unsigned ncols, nrows, cap;
    char **cells; /* row-major, row 0 = headers */
};

struct cli_table *
cli_table_new(unsigned ncols, const char *const *headers)
{
    struct cli_table *t = xcalloc(1, sizeof *t);
    t->ncols = ncols;
    cli_table_row(t, headers);
    return t;
}

void
cli_table_row(struct cli_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 16;
        t->cells = xrealloc(t->cells, (size_t)t->cap * t->ncols *
                                          sizeof *t->cells);
    }
    for (unsigned i = 0; i < t->ncols; i++) {
        /* One line per cell: a newline would break the columns. */
        char *s = xstrdup(cells[i] ? cells[i] : "");
        for (char *p = s; *p; p++) {
            if (*p == '\n' || *p == '\t' || *p == '\r')
                *p = ' ';
        }
        t->cells[(size_t)t->nrows * t->ncols + i] = s;
    }
    t->nrows++;
}

void
cli_table_print(struct cli_table *t, unsigned indent)
{
    CLEANUP_FREE size_t *w = xcalloc(t->ncols, sizeof *w);
    for (unsigned r = 0; r < t->nrows; r++) {
        for (unsigned i = 0; i < t->ncols; i++) {
            size_t n = strlen(t->cells[(size_t)r * t->ncols + i]);
            if (n > w[i])
                w[i] = n;
        }
    }
    for (unsigned r = 0; r < t->nrows; r++) {
        printf("%*s", (int)indent, "");
        for (unsigned i = 0; i < t->ncols; i++) {
            const char *s = t->cells[(size_t)r * t->ncols + i];
            if (i + 1 == t->ncols)
                printf("%s\n", s);
            else
                printf("%-*s  ", (int)w[i], s);
        }
    }
}

void
cli_table_free(struct cli_table *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < (size_t)t->nrows * t->ncols; i++)
        free(t->cells[i]);
    free(t->cells);
    free(t);
}

const char *
cli_q(const char *name)
{
    static char bufs[4][VR_QNAME_MAX];
    static unsigned next;
    return vr_qname(name, bufs[next++ % ARRAY_SIZE(bufs)]);
}

int
cli_parse_port(const char *s, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < 1 || v > 65535)
        return -1;
    *out = v;
    return 0;
}

char *
cli_abspath(const char *path)
{
    char *joined;
    if (path[0] == '/') {
        joined = xstrdup(path);
    } else {
        char *cwd = getcwd(NULL, 0);
        if (!cwd)
            return xstrdup(path);
        joined = xasprintf("%s/%s", cwd, path);
        free(cwd);
    }
    /* Drop "." and empty components and fold "..", lexically (the file
     * may not exist here: the daemon reports that). */
    char *out = xmalloc(strlen(joined) + 2);
    size_t n = 0;
    char *save = NULL;
    for (char *seg = strtok_r(joined, "/", &save); seg;
         seg = strtok_r(NULL, "/", &save)) {
        if (strcmp(seg, ".") == 0)
            continue;
        if (strcmp(seg, "..") == 0) {
            while (n > 0 && out[n - 1] != '/')
                n--;
            if (n > 0)
                n--; /* the slash */
            continue;
        }
        out[n++] = '/';
        size_t len = strlen(seg);
        memcpy(out + n, seg, len);
        n += len;
    }
    if (n == 0)
        out[n++] = '/';
    out[n] = '\0';
    free(joined);
    return out;
}

/* --- main -------------------------------------------------------------- */

static int
run(int argc, char **argv)
{
    struct cli c = { .connect = NULL, .json = false };
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            c.json = true;
        } else if (strcmp(a, "--connect") == 0) {
            if (i + 1 >= argc || !*argv[i + 1])
                return cli_usage_error(NULL, "option '--connect' needs a "
                                       "value (run 'vmreplica --help')");
            c.connect = argv[++i];
        } else if (strncmp(a, "--connect=", 10) == 0) {
            c.connect = a + 10;
            if (!*c.connect)
                return cli_usage_error(NULL, "option '--connect' needs a "
                                       "value (run 'vmreplica --help')");
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            print_overview(stdout);
            return CLI_OK;
        } else if (strcmp(a, "--version") == 0 || strcmp(a, "-V") == 0) {
            printf("vmreplica %s\n", VERSION);
            return CLI_OK;
        } else if (a[0] == '-') {
            return cli_usage_error(NULL, "unknown option '%s' (run "
                                   "'vmreplica --help')", a);
        } else {
            break;
        }
    }
    if (!c.connect) {
        const char *env = getenv("VMREPLICA_SOCKET");
        c.connect = env && *env ? env : DEFAULT_SOCKET;
    }
    if (i >= argc) {
        print_overview(stderr);
        return CLI_USAGE;
    }

    const char *noun = argv[i++];
    if (strcmp(noun, "help") == 0) {
        if (i >= argc) {
            print_overview(stdout);
            return CLI_OK;
        }
        if (!noun_exists(argv[i]))
            return cli_usage_error(NULL, "unknown command '%s' (run "
                                   "'vmreplica help')", argv[i]);
        const struct cli_cmd *cmd =
            find_cmd(argv[i], i + 1 < argc ? argv[i + 1] : NULL);
        if (cmd && (!cmd->verb || i + 1 < argc))
            cli_print_usage(cmd, stdout);
        else if (i + 1 < argc)
            return cli_usage_error(NULL, "unknown command '%s %s' (run "
                                   "'vmreplica help %s')", argv[i],
                                   argv[i + 1], argv[i]);
        else
            print_noun(argv[i], stdout);
        return CLI_OK;
    }
    if (!noun_exists(noun))
        return cli_usage_error(NULL, "unknown command '%s' (run 'vmreplica "
                               "--help')", noun);

    const struct cli_cmd *cmd = find_cmd(noun, NULL);
    if (!cmd) { /* the noun needs a verb */
        const char *verb = i < argc ? argv[i] : NULL;
        if (verb && (strcmp(verb, "--help") == 0 || strcmp(verb, "-h") == 0 ||
                     strcmp(verb, "help") == 0)) {
            print_noun(noun, stdout);
            return CLI_OK;
        }
        if (!verb) {
            cli_error("missing verb after '%s'", noun);
            print_noun(noun, stderr);
            return CLI_USAGE;
        }
        cmd = find_cmd(noun, verb);
        if (!cmd) {
            cli_error("unknown command '%s %s'", noun, verb);
            print_noun(noun, stderr);
            return CLI_USAGE;
        }
        i++;
    }
    int rc = cmd->fn(&c, cmd, argc - i, argv + i);
    return rc < 0 ? CLI_OK : rc; /* -1: help was printed */
}

int
main(int argc, char **argv)
{
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fputs("vmreplica: error: cannot initialize libcurl\n", stderr);
        return CLI_ERR;
    }
    int rc = run(argc, argv);
    curl_global_cleanup();
    if (fflush(stdout) != 0 && rc == CLI_OK) {
        fprintf(stderr, "vmreplica: error: write to stdout: %s\n",
                strerror(errno));
        rc = CLI_ERR;
    }
    return rc;
}
