/* server.c: "vmreplica server show|set" — this host's Replica server
 * settings (GET/PUT /v1/server), the Set-/Get-VMReplicationServer of
 * Hyper-V.  Certificate and storage paths are made absolute here; the
 * daemon checks that it can read them.  "server firewall" (GET/PUT
 * /v1/server/firewall) stands in for the Windows firewall rules Hyper-V
 * Replica ships, and "auth-entry" for its authorization entries.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static void
print_server(json_object *s)
{
    char buf[32];
    cli_kv("Hostname", "%s", cli_str(s, "hostname"));
    cli_kv("Version", "%s", cli_str(s, "version"));
    cli_kv("State directory", "%s", cli_str(s, "state_dir"));
    cli_kv("Replica server", "%s",
           cli_bool(s, "replica_enabled") ? "enabled" : "disabled");
    cli_kv("Authentication", "%s",
           cli_has(s, "auth") ? cli_str(s, "auth") : "-");
    if (cli_has(s, "certificate_port"))
        cli_kv("Certificate port", "%" PRId64, cli_int(s, "certificate_port"));
    cli_kv("Certificate", "%s",
           cli_has(s, "certificate") ? cli_str(s, "certificate") : "-");
    cli_kv("Key", "%s", cli_has(s, "key") ? cli_str(s, "key") : "-");
    cli_kv("Certificate thumbprint", "%s",
           cli_has(s, "certificate_thumbprint")
               ? cli_str(s, "certificate_thumbprint")
               : "-");
    if (cli_has(s, "certificate_store"))
        cli_kv("Certificate store", "%s", cli_str(s, "certificate_store"));
    cli_kv("CA", "%s", cli_has(s, "ca") ? cli_str(s, "ca") : "-");
    cli_kv("CRL", "%s", cli_has(s, "crl") ? cli_str(s, "crl") : "-");
    if (cli_has(s, "kerberos_port"))
        cli_kv("Kerberos port", "%" PRId64, cli_int(s, "kerberos_port"));
    cli_kv("Keytab", "%s", cli_has(s, "keytab") ? cli_str(s, "keytab") : "-");
    cli_kv("Kerberos encryption", "%s",
           cli_bool(s, "kerberos_encrypt") ? "required" : "optional");
    cli_kv("Allow any server", "%s", cli_bool(s, "allow_any") ? "yes" : "no");
    cli_kv("Default storage", "%s",
           cli_has(s, "default_storage") ? cli_str(s, "default_storage")
                                         : "-");
    cli_kv("Listening", "%s", cli_bool(s, "listening") ? "yes" : "no");
    if (cli_has(s, "web_listen"))
        cli_kv("Web listener", "%s (%s)", cli_str(s, "web_listen"),
               cli_bool(s, "listening_web") ? "listening" : "not listening");
    else
        cli_kv("Web listener", "off");
    cli_kv("Firewall", "%s",
           cli_bool(s, "firewall_enabled") ? "enabled" : "disabled");
    if (cli_has(s, "hypervisor"))
        cli_kv("Hypervisor", "%s", cli_str(s, "hypervisor"));
    cli_kv("Monitoring interval", "%s",
           cli_fmt_duration((uint64_t)cli_int(s, "monitoring_interval"), buf,
                            sizeof buf));
}

static int
finish(struct cli *c, json_object *out)
{
    /* The settings were applied; say so if the firewall could not follow. */
    if (cli_has(out, "firewall_error"))
        fprintf(stderr, "vmreplica: warning: %s\n",
                cli_str(out, "firewall_error"));
    if (c->json)
        cli_print_json(out);
    else if (out)
        print_server(out);
    json_object_put(out);
    return CLI_OK;
}

int
cmd_server_show(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, NULL, pos, 0, &npos);
    if (rc)
        return rc;
    json_object *out;
    if ((rc = cli_call(c, "GET", "/v1/server", NULL, &out)))
        return rc;
    return finish(c, out);
}

static void
add_path(json_object *body, const char *key, const char *path)
{
    if (!path)
        return;
    char *abs = cli_abspath(path);
    json_object_object_add(body, key, json_object_new_string(abs));
    free(abs);
}

int
cmd_server_set(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    bool enable = false, disable = false, allow = false, no_allow = false,
         no_crl = false, no_web = false;
    const char *auth = NULL, *port = NULL, *cert = NULL, *key = NULL,
               *ca = NULL, *hostname = NULL, *storage = NULL,
               *interval = NULL, *kport = NULL, *keytab = NULL,
               *kencrypt = NULL, *crl = NULL, *store = NULL, *thumb = NULL,
               *web = NULL, *hv = NULL;
    const struct cli_opt opts[] = {
        { "enable", CLI_OPT_FLAG, &enable },
        { "disable", CLI_OPT_FLAG, &disable },
        { "auth", CLI_OPT_STR, &auth },
        { "certificate-port", CLI_OPT_STR, &port },
        { "kerberos-port", CLI_OPT_STR, &kport },
        { "keytab", CLI_OPT_STR, &keytab },
        { "kerberos-encrypt", CLI_OPT_STR, &kencrypt },
        { "certificate", CLI_OPT_STR, &cert },
        { "key", CLI_OPT_STR, &key },
        { "ca", CLI_OPT_STR, &ca },
        { "crl", CLI_OPT_STR, &crl },
        { "certificate-store", CLI_OPT_STR, &store },
        { "certificate-thumbprint", CLI_OPT_STR, &thumb },
        { "no-crl", CLI_OPT_FLAG, &no_crl },
        { "hostname", CLI_OPT_STR, &hostname },
        { "allow-any", CLI_OPT_FLAG, &allow },
        { "no-allow-any", CLI_OPT_FLAG, &no_allow },
        { "default-storage", CLI_OPT_STR, &storage },
        { "monitoring-interval", CLI_OPT_STR, &interval },
        { "web-listen", CLI_OPT_STR, &web },
        { "no-web-listen", CLI_OPT_FLAG, &no_web },
        { "hypervisor", CLI_OPT_STR, &hv },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, 0, &npos);
    if (rc)
        return rc;
    if (enable && disable)
        return cli_usage_error(cmd, "--enable and --disable conflict");
    if (thumb && cert)
        return cli_usage_error(cmd, "--certificate-thumbprint chooses the "
                               "certificate: not with --certificate");
    if (crl && no_crl)
        return cli_usage_error(cmd, "--crl and --no-crl conflict");
    if (allow && no_allow)
        return cli_usage_error(cmd, "--allow-any and --no-allow-any "
                               "conflict");
    if (web && no_web)
        return cli_usage_error(cmd, "--web-listen and --no-web-listen "
                               "conflict");
    if (hv && strcmp(hv, "qemu") != 0 && strcmp(hv, "libvirt") != 0)
        return cli_usage_error(cmd, "invalid --hypervisor '%s': expected "
                               "qemu or libvirt", hv);
    if (auth && strcmp(auth, "certificate") != 0 &&
        strcmp(auth, "kerberos") != 0 && strcmp(auth, "both") != 0)
        return cli_usage_error(cmd, "invalid --auth '%s': expected "
                               "certificate, kerberos or both", auth);
    long port_n = 0, kport_n = 0;
    if (port && cli_parse_port(port, &port_n) < 0)
        return cli_usage_error(cmd, "invalid --certificate-port '%s': "
                               "expected 1-65535", port);
    if (kport && cli_parse_port(kport, &kport_n) < 0)
        return cli_usage_error(cmd, "invalid --kerberos-port '%s': "
                               "expected 1-65535", kport);
    if (kencrypt && strcmp(kencrypt, "on") != 0 &&
        strcmp(kencrypt, "off") != 0)
        return cli_usage_error(cmd, "invalid --kerberos-encrypt '%s': "
                               "expected on or off", kencrypt);
    uint64_t interval_s = 0;
    if (interval && (vr_parse_duration(interval, &interval_s) < 0 ||
                     interval_s == 0))
        return cli_usage_error(cmd, "invalid --monitoring-interval '%s': "
                               "expected a duration such as 12h, 30m or "
                               "3600", interval);

    json_object *body = json_object_new_object();
    if (enable || disable)
        json_object_object_add(body, "replica_enabled",
                               json_object_new_boolean(enable));
    if (auth)
        json_object_object_add(body, "auth", json_object_new_string(auth));
    if (port)
        json_object_object_add(body, "certificate_port",
                               json_object_new_int((int)port_n));
    if (kport)
        json_object_object_add(body, "kerberos_port",
                               json_object_new_int((int)kport_n));
    add_path(body, "keytab", keytab);
    if (kencrypt)
        json_object_object_add(
            body, "kerberos_encrypt",
            json_object_new_boolean(strcmp(kencrypt, "on") == 0));
    add_path(body, "certificate", cert);
    add_path(body, "key", key);
    add_path(body, "ca", ca);
    add_path(body, "crl", crl);
    add_path(body, "certificate_store", store);
    if (thumb)
        json_object_object_add(body, "certificate_thumbprint",
                               json_object_new_string(thumb));
    if (no_crl)
        json_object_object_add(body, "crl", json_object_new_string(""));
    if (hostname)
        json_object_object_add(body, "hostname",
                               json_object_new_string(hostname));
    if (allow || no_allow)
        json_object_object_add(body, "allow_any",
                               json_object_new_boolean(allow));
    add_path(body, "default_storage", storage);
    if (interval)
        json_object_object_add(body, "monitoring_interval",
                               json_object_new_int64((int64_t)interval_s));
    if (web || no_web) /* the daemon checks the address ("": off) */
        json_object_object_add(body, "web_listen",
                               json_object_new_string(no_web ? "" : web));
    if (hv)
        json_object_object_add(body, "hypervisor", json_object_new_string(hv));
    if (json_object_object_length(body) == 0) {
        json_object_put(body);
        return cli_usage_error(cmd, "nothing to set");
    }

    json_object *out;
    rc = cli_call(c, "PUT", "/v1/server", body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    return finish(c, out);
}

/* --- firewall ------------------------------------------------------------- */

static void
print_firewall(json_object *f)
{
    json_object *ports;
    bool on = cli_bool(f, "enabled");
    cli_kv("Firewall", "%s",
           on ? "enabled"
              : "disabled (vmreplica does not change this host's firewall)");
    char list[64] = "";
    size_t n = 0;
    if (json_object_object_get_ex(f, "ports", &ports))
        n = json_object_array_length(ports);
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(list);
        snprintf(list + len, sizeof list - len, "%s%d/tcp", i ? ", " : "",
                 json_object_get_int(json_object_array_get_idx(ports, i)));
    }
    cli_kv("Listener ports", "%s", n ? list : "none (no listener runs)");
    cli_kv("Mark", "%s", cli_str(f, "mark"));
    cli_kv("Table", "%s", cli_str(f, "table_name"));
    if (cli_has(f, "error"))
        cli_kv("Error", "%s", cli_str(f, "error"));
    if (cli_has(f, "table")) {
        printf("\n");
        const char *t = cli_str(f, "table");
        while (*t) {
            size_t len = strcspn(t, "\n");
            printf("    %.*s\n", (int)len, t);
            t += len + (t[len] == '\n');
        }
    }
    /* The daemon's hint, folded at 76 columns. */
    printf("\nNote:");
    unsigned col = 5;
    for (const char *w = cli_str(f, "hint"); *w;) {
        size_t len = strcspn(w, " ");
        if (col + 1 + len > 76) {
            printf("\n     ");
            col = 5;
        }
        printf(" %.*s", (int)len, w);
        col += 1 + (unsigned)len;
        w += len + (w[len] == ' ');
    }
    printf("\n");
}

int
cmd_server_firewall(struct cli *c, const struct cli_cmd *cmd, int argc,
                    char **argv)
{
    const char *pos[1];
    int rc = cli_parse_args(c, cmd, argc, argv, NULL, pos, 1, "enable|disable|show");
    if (rc)
        return rc;
    json_object *out, *body = NULL;
    if (strcmp(pos[0], "show") == 0) {
        rc = cli_call(c, "GET", "/v1/server/firewall", NULL, &out);
    } else if (strcmp(pos[0], "enable") == 0 ||
               strcmp(pos[0], "disable") == 0) {
        body = json_object_new_object();
        json_object_object_add(
            body, "enabled",
            json_object_new_boolean(strcmp(pos[0], "enable") == 0));
        rc = cli_call(c, "PUT", "/v1/server/firewall", body, &out);
        json_object_put(body);
    } else {
        return cli_usage_error(cmd, "unknown action '%s': expected enable, "
                               "disable or show", pos[0]);
    }
    if (rc)
        return rc;
    if (c->json)
        cli_print_json(out);
    else if (out)
        print_firewall(out);
    json_object_put(out);
    return CLI_OK;
}

/* --- authorization entries ------------------------------------------------ */

/* auth-entry add|set: --primary (add) or PATTERN (set), --storage,
 * --trust-group, --max-vms. */
static int
auth_put(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv,
         bool add)
{
    const char *primary = NULL, *storage = NULL, *group = NULL,
               *max_vms = NULL;
    const struct cli_opt opts_add[] = {
        { "primary", CLI_OPT_STR, &primary },
        { "storage", CLI_OPT_STR, &storage },
        { "trust-group", CLI_OPT_STR, &group },
        { "max-vms", CLI_OPT_STR, &max_vms },
        { NULL, 0, NULL },
    };
    const struct cli_opt *opts = add ? opts_add : opts_add + 1;
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, opts, pos, add ? 0 : 1, &npos);
    if (rc)
        return rc;
    if (!add && (rc = cli_want_args(cmd, npos, 1, "PATTERN")))
        return rc;
    if (add && !primary)
        return cli_usage_error(cmd, "missing --primary PATTERN");
    if (add && !storage)
        return cli_usage_error(cmd, "missing --storage DIR");
    char *end = NULL;
    long long nmax = 0;
    if (max_vms) {
        errno = 0;
        nmax = strtoll(max_vms, &end, 10);
        if (errno || end == max_vms || *end || nmax < 1)
            return cli_usage_error(cmd, "--max-vms: expected a number >= 1");
    }
    json_object *body = json_object_new_object();
    if (max_vms)
        json_object_object_add(body, "max_vms", json_object_new_int64(nmax));
    if (add)
        json_object_object_add(body, "primary",
                               json_object_new_string(primary));
    add_path(body, "storage", storage);
    if (group)
        json_object_object_add(body, "trust_group",
                               json_object_new_string(group));
    CLEANUP_FREE char *esc = add ? NULL : cli_escape(pos[0]);
    CLEANUP_FREE char *path = add ? xstrdup("/v1/auth-entries")
                                  : xasprintf("/v1/auth-entries/%s", esc);
    json_object *out;
    rc = cli_call(c, add ? "POST" : "PUT", path, body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (cli_has(out, "warning"))
        fprintf(stderr, "vmreplica: warning: %s\n", cli_str(out, "warning"));
    if (c->json)
        cli_print_json(out);
    else
        printf("authorization entry %s: storage %s, trust group '%s', at "
               "most %lld Replica VMs\n",
               cli_str(out, "primary"), cli_str(out, "storage"),
               cli_str(out, "trust_group"),
               (long long)cli_int(out, "max_vms"));
    json_object_put(out);
    return CLI_OK;
}

int
cmd_auth_add(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    return auth_put(c, cmd, argc, argv, true);
}

int
cmd_auth_set(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    return auth_put(c, cmd, argc, argv, false);
}

int
cmd_auth_list(struct cli *c, const struct cli_cmd *cmd, int argc, char **argv)
{
    const char *pos[1];
    unsigned npos;
    int rc = cli_parse(c, cmd, argc, argv, NULL, pos, 0, &npos);
    if (rc)
        return rc;
    json_object *out, *arr;
    if ((rc = cli_call(c, "GET", "/v1/auth-entries", NULL, &out)))
        return rc;
    if (c->json) {
        cli_print_json(out);
    } else if (json_object_object_get_ex(out, "entries", &arr)) {
        printf("%-32s %-12s %-7s %s\n", "PRIMARY", "TRUST GROUP", "MAX VMS",
               "STORAGE");
        for (size_t i = 0; i < json_object_array_length(arr); i++) {
            json_object *e = json_object_array_get_idx(arr, i);
            printf("%-32s %-12s %-7lld %s\n", cli_str(e, "primary"),
                   *cli_str(e, "trust_group") ? cli_str(e, "trust_group")
                                              : "-",
                   (long long)cli_int(e, "max_vms"), cli_str(e, "storage"));
        }
    }
    json_object_put(out);
    return CLI_OK;
}

int
cmd_auth_remove(struct cli *c, const struct cli_cmd *cmd, int argc,
                char **argv)
{
    const char *pos[1];
    int rc = cli_parse_args(c, cmd, argc, argv, NULL, pos, 1, "PATTERN");
    if (rc)
        return rc;
    CLEANUP_FREE char *esc = cli_escape(pos[0]);
    CLEANUP_FREE char *path = xasprintf("/v1/auth-entries/%s", esc);
    json_object *out;
    if ((rc = cli_call(c, "DELETE", path, NULL, &out)))
        return rc;
    if (c->json)
        cli_print_json(out);
    else
        printf("authorization entry %s removed\n", pos[0]);
    json_object_put(out);
    return CLI_OK;
}

int
cmd_server_test_connection(struct cli *c, const struct cli_cmd *cmd, int argc,
                           char **argv)
{
    const char *auth = NULL, *address = NULL;
    const struct cli_opt opts[] = {
        { "auth", CLI_OPT_STR, &auth },
        { "connect-address", CLI_OPT_STR, &address },
        { NULL, 0, NULL },
    };
    const char *pos[1];
    int rc = cli_parse_args(c, cmd, argc, argv, opts, pos, 1, "FQDN[:PORT]");
    if (rc)
        return rc;
    if (!auth)
        return cli_usage_error(cmd, "missing --auth certificate|kerberos");
    json_object *body = json_object_new_object();
    json_object_object_add(body, "replica_server",
                           json_object_new_string(pos[0]));
    json_object_object_add(body, "auth", json_object_new_string(auth));
    if (address)
        json_object_object_add(body, "connect_address",
                               json_object_new_string(address));
    json_object *out;
    rc = cli_call(c, "POST", "/v1/server/test-connection", body, &out);
    json_object_put(body);
    if (rc)
        return rc;
    if (c->json) {
        cli_print_json(out);
    } else {
        printf("%s accepts replication from %s (%s authentication)\n",
               cli_str(out, "replica_server"), cli_str(out, "primary"),
               cli_str(out, "auth"));
        cli_kv("Replica server", "%s", cli_str(out, "server"));
        cli_kv("Storage location", "%s", cli_str(out, "storage"));
        cli_kv("Trust group", "%s",
               *cli_str(out, "trust_group") ? cli_str(out, "trust_group")
                                            : "-");
    }
    json_object_put(out);
    return CLI_OK;
}
