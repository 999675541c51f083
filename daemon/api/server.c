/* server.c: the server endpoints of the management API — `server show`
 * and `server set` (settings, this host's TLS and Kerberos identity, the
 * Replica server's listeners), applied whole or not at all. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "api-int.h"
#include "proc/vmproc.h"
#include "web.h"

static json_object *
server_json(void)
{
    const struct server_cfg *c = &actx.d->cfg;
    json_object *o = json_object_new_object();
#define STR(k, v)                                                              \
    json_object_object_add(o, k, (v) ? json_object_new_string(v) : NULL)
    STR("hostname", c->hostname);
    STR("version", VERSION);
    STR("state_dir", actx.d->state_dir);
    json_object_object_add(o, "replica_enabled",
                           json_object_new_boolean(c->replica_enabled));
    STR("auth", c->auth);
    /* 0 until the first 'server set --enable': show the port that would
     * be used then, not 0 (SPEC: default 443, 80 for Kerberos). */
    json_object_object_add(o, "certificate_port",
                           json_object_new_int(c->cert_port ? (int)c->cert_port
                                                            : 443));
    STR("certificate", c->cert);
    STR("key", c->key);
    STR("ca", c->ca);
    STR("crl", c->crl);
    char sha1[41];
    const char *thumb =
        c->cert && tls_thumbprint(c->cert, sha1) == 0 ? sha1 : NULL;
    STR("certificate_thumbprint", thumb);
    STR("certificate_store", c->cert_store);
    json_object_object_add(o, "kerberos_port",
                           json_object_new_int(c->krb_port ? (int)c->krb_port
                                                           : 80));
    STR("keytab", c->keytab);
    json_object_object_add(o, "kerberos_encrypt",
                           json_object_new_boolean(c->krb_encrypt));
    json_object_object_add(o, "allow_any",
                           json_object_new_boolean(c->allow_any));
    STR("default_storage", c->default_storage);
    json_object_object_add(
        o, "listening",
        json_object_new_boolean(actx.d->listener != NULL ||
                                actx.d->krb_listener != NULL));
    json_object_object_add(o, "listening_certificate",
                           json_object_new_boolean(actx.d->listener != NULL));
    json_object_object_add(
        o, "listening_kerberos",
        json_object_new_boolean(actx.d->krb_listener != NULL));
    json_object_object_add(o, "monitoring_interval",
                           json_object_new_int((int)c->monitoring_interval_s));
    json_object_object_add(o, "firewall_enabled",
                           json_object_new_boolean(c->firewall_enabled));
    STR("firewall_error", firewall_error());
    STR("web_listen", c->web_listen);
    json_object_object_add(o, "listening_web",
                           json_object_new_boolean(web_listening()));
    STR("hypervisor", c->hypervisor_libvirt ? "libvirt" : "qemu");
#undef STR
    return o;
}

int
api_server_show(struct api_call *call VR_UNUSED, unsigned *status VR_UNUSED,
                json_object **out)
{
    pthread_mutex_lock(&actx.d->lock);
    *out = server_json();
    pthread_mutex_unlock(&actx.d->lock);
    return 0;
}

static int
abs_path_arg(json_object *body, const char *key, char **field)
{
    const char *v = jstr(body, key);
    if (!v)
        return 0;
    if (v[0] != '/')
        return vr_err(-EINVAL, "%s: must be an absolute path: %s", key, v);
    free(*field);
    *field = xstrdup(v);
    return 0;
}

static int
port_arg(json_object *body, const char *key, unsigned *field)
{
    json_object *v;
    if (!json_object_object_get_ex(body, key, &v))
        return 0;
    int64_t p = json_object_get_int64(v);
    if (p < 1 || p > 65535)
        return vr_err(-EINVAL, "%s: out of range: %lld", key, (long long)p);
    *field = (unsigned)p;
    return 0;
}

/* Give c copies of its strings, so that a refusal can restore the old. */
static void
cfg_copy_strings(struct server_cfg *c)
{
    c->hostname = c->hostname ? xstrdup(c->hostname) : NULL;
    c->auth = c->auth ? xstrdup(c->auth) : NULL;
    c->cert = c->cert ? xstrdup(c->cert) : NULL;
    c->key = c->key ? xstrdup(c->key) : NULL;
    c->ca = c->ca ? xstrdup(c->ca) : NULL;
    c->keytab = c->keytab ? xstrdup(c->keytab) : NULL;
    c->crl = c->crl ? xstrdup(c->crl) : NULL;
    c->cert_store = c->cert_store ? xstrdup(c->cert_store) : NULL;
    c->thumbprint = c->thumbprint ? xstrdup(c->thumbprint) : NULL;
    c->default_storage = c->default_storage ? xstrdup(c->default_storage)
                                            : NULL;
    c->web_listen = c->web_listen ? xstrdup(c->web_listen) : NULL;
}

static void
cfg_free_strings(struct server_cfg *c)
{
    free(c->hostname);
    free(c->auth);
    free(c->cert);
    free(c->key);
    free(c->ca);
    free(c->keytab);
    free(c->crl);
    free(c->cert_store);
    free(c->thumbprint);
    free(c->default_storage);
    free(c->web_listen);
}

/* The switches, ports and authentication of a `server set` body. */
static int
cfg_set_listener(json_object *b, struct server_cfg *c)
{
    json_object *v;
    if (json_object_object_get_ex(b, "replica_enabled", &v))
        c->replica_enabled = json_object_get_boolean(v);
    if (json_object_object_get_ex(b, "allow_any", &v))
        c->allow_any = json_object_get_boolean(v);
    int rc = port_arg(b, "certificate_port", &c->cert_port);
    if (rc == 0)
        rc = port_arg(b, "kerberos_port", &c->krb_port);
    if (rc < 0)
        return rc;
    if (json_object_object_get_ex(b, "kerberos_encrypt", &v))
        c->krb_encrypt = json_object_get_boolean(v);
    if (json_object_object_get_ex(b, "monitoring_interval", &v))
        c->monitoring_interval_s = (unsigned)json_object_get_int64(v);
    const char *hv = jstr(b, "hypervisor");
    enum vmproc_hv h;
    if (hv && vmproc_hv_parse(hv, &h) < 0)
        return -EINVAL;
    if (hv)
        c->hypervisor_libvirt = h == VMPROC_HV_LIBVIRT;
    const char *web = jstr(b, "web_listen");
    if (web) {
        free(c->web_listen); /* "": off */
        c->web_listen = *web ? xstrdup(web) : NULL;
    }
    const char *auth = jstr(b, "auth");
    if (!auth)
        return 0;
    if (strcmp(auth, "certificate") != 0 && strcmp(auth, "kerberos") != 0 &&
        strcmp(auth, "both") != 0)
        return vr_err(-EINVAL, "auth %s: expected certificate, kerberos or "
                      "both", auth);
    free(c->auth);
    c->auth = xstrdup(auth);
    return 0;
}

/* Hyper-V's -CertificateThumbprint: one of several certificates (NAME.pem
 * with NAME.key) in the store directory becomes cert and key. */
static int
cfg_set_from_store(json_object *b, struct server_cfg *c)
{
    const char *thumb = jstr(b, "certificate_thumbprint");
    if (!thumb && !jstr(b, "certificate_store"))
        return 0;
    if (!thumb)
        thumb = c->thumbprint;
    if (!thumb || !c->cert_store)
        return vr_err(-EINVAL, "certificate_thumbprint and "
                      "certificate_store go together");
    char *cert = NULL, *key = NULL;
    int rc = tls_find_by_thumbprint(c->cert_store, thumb, &cert, &key);
    if (rc < 0)
        return rc;
    char norm[65];
    VR_IGNORE(tls_thumbprint_norm(thumb, norm));
    free(c->cert);
    free(c->key);
    free(c->thumbprint);
    c->cert = cert;
    c->key = key;
    c->thumbprint = xstrdup(norm);
    return 0;
}

/* This host's identity from a `server set` body: certificate files or a
 * certificate store, CA, keytab, revocation list, default storage and
 * host name. */
static int
cfg_set_identity(json_object *b, struct server_cfg *c)
{
    if (jstr(b, "certificate")) {
        free(c->cert_store); /* files given: no longer from a store */
        free(c->thumbprint);
        c->cert_store = c->thumbprint = NULL;
    }
    int rc = abs_path_arg(b, "certificate", &c->cert);
    if (rc == 0)
        rc = abs_path_arg(b, "key", &c->key);
    if (rc == 0)
        rc = abs_path_arg(b, "certificate_store", &c->cert_store);
    if (rc == 0)
        rc = cfg_set_from_store(b, c);
    if (rc == 0)
        rc = abs_path_arg(b, "ca", &c->ca);
    if (rc == 0)
        rc = abs_path_arg(b, "keytab", &c->keytab);
    const char *crl = jstr(b, "crl");
    if (rc == 0 && crl && !*crl) {
        free(c->crl); /* "": no revocation list */
        c->crl = NULL;
    } else if (rc == 0) {
        rc = abs_path_arg(b, "crl", &c->crl);
    }
    if (rc == 0)
        rc = abs_path_arg(b, "default_storage", &c->default_storage);
    const char *hn = jstr(b, "hostname");
    if (rc == 0 && hn) {
        free(c->hostname);
        c->hostname = xstrdup(hn);
    }
    return rc;
}

/* Do the settings hold together: valid TLS material, and what an enabled
 * Replica server needs (default ports filled in)? */
static int
cfg_check(struct server_cfg *c)
{
    int rc = 0;
    if (c->cert || c->key || c->ca)
        rc = tls_check_material(c->cert, c->key, c->ca);
    if (rc == 0 && !c->hostname && c->cert)
        c->hostname = tls_cert_dns_name(c->cert);
    if (rc < 0 || !c->replica_enabled)
        return rc;
    bool cert = cfg_wants_certificate(c);
    bool krb = cfg_wants_kerberos(c);
    if (cert && (!c->cert || !c->key || !c->ca))
        return vr_err(-EINVAL, "replica server: certificate, key and ca "
                               "are required to enable it");
    if (krb && (!c->keytab || !c->hostname))
        return vr_err(-EINVAL, "replica server: Kerberos needs --keytab "
                               "(with HTTP/%s) and this host's name "
                               "(--hostname)",
                      c->hostname ? c->hostname : "FQDN");
    if (c->allow_any && !c->default_storage)
        return vr_err(-EINVAL, "replica server: allow_any needs a "
                               "default_storage directory");
    if (!c->cert_port)
        c->cert_port = 443;
    if (!c->krb_port)
        c->krb_port = 80;
    if (cert && krb && c->cert_port == c->krb_port)
        return vr_err(-EINVAL, "replica server: the certificate and "
                      "Kerberos ports must differ (%u)", c->krb_port);
    return 0;
}

/* PUT /v1/server: change the settings, restart the listeners to match,
 * persist; a refusal at any step leaves settings and listeners as they
 * were. */
int
api_server_set(struct api_call *call, unsigned *status VR_UNUSED,
               json_object **out)
{
    json_object *b = call->body;
    pthread_mutex_lock(&actx.d->lock);
    struct server_cfg old = actx.d->cfg;
    struct server_cfg *c = &actx.d->cfg;
    cfg_copy_strings(c);
    int rc = cfg_set_listener(b, c);
    if (rc == 0)
        rc = cfg_set_identity(b, c);
    if (rc == 0)
        rc = cfg_check(c);
    /* A new certificate must be usable now: the next cycle would fail
     * with it.  (One stored earlier that has since expired does not
     * block other settings.) */
    if (rc == 0 && c->cert &&
        (json_object_object_get_ex(b, "certificate", NULL) ||
         json_object_object_get_ex(b, "certificate_thumbprint", NULL)))
        rc = tls_check_validity(c->cert);
    if (rc == 0)
        rc = web_check(c);
    if (rc == 0 && c->default_storage)
        rc = io_mkdir_p(c->default_storage, 0750);
    if (rc == 0)
        rc = replica_listener_apply();
    if (rc == 0)
        rc = web_apply();
    if (rc == 0)
        rc = catalog_save_server(actx.d->cat, &actx.d->cfg);
    cfg_free_strings(rc == 0 ? &old : c);
    if (rc < 0) {
        *c = old;
        /* Restore the listener that matched the old settings. */
        char saved[1024];
        snprintf(saved, sizeof saved, "%s", vr_errmsg());
        VR_IGNORE(replica_listener_apply());
        VR_IGNORE(web_apply());
        vr_err(rc, "%s", saved);
    } else {
        event_add(actx.d->cat, "info", NULL, "server settings changed%s",
                  c->replica_enabled ? " (replica server enabled)" : "");
        /* The settings stand; a firewall that cannot follow them is an
         * error event and shows in firewall_error. */
        firewall_sync();
        vmproc_set_default_hv(c->hypervisor_libvirt ? VMPROC_HV_LIBVIRT
                                                    : VMPROC_HV_QEMU);
        *out = server_json();
    }
    pthread_mutex_unlock(&actx.d->lock);
    return rc;
}

/* --- server test-connection ----------------------------------------------- */

/* Test-VMReplicationConnection: reach a Replica server the way replication
 * would (same authentication, same client code) and ask it whether it
 * would accept this host.  Each failure says at which step it happened. */
int
api_test_connection(struct api_call *call, unsigned *status VR_UNUSED,
                    json_object **out)
{
    json_object *b = call->body;
    const char *server = jstr(b, "replica_server");
    const char *auth = jstr(b, "auth");
    const char *addr = jstr(b, "connect_address");
    if (!server || !repl_server_name_valid(server))
        return vr_err(-EINVAL, "replica_server: expected FQDN[:PORT]");
    int rc = auth ? repl_auth_check(auth) : 0;
    if (rc < 0)
        return rc;
    /* A replication of a moment, as `replication enable` would make it. */
    struct repl r = { .auth = (char *)(auth ? auth : "certificate"),
                      .connect_address = (char *)(addr && *addr ? addr
                                                                : NULL),
                      .epoch = 1, .point_interval_s = 3600 };
    CLEANUP_FREE char *with_port = repl_server_with_port(server, &r);
    r.replica_server = with_port;
    struct peer p = { 0 };
    pthread_mutex_lock(&actx.d->lock);
    rc = repl_check_identity(&actx.d->cfg, &r);
    if (rc == 0)
        peer_fill(&p, &r);
    pthread_mutex_unlock(&actx.d->lock);
    json_object *resp = NULL;
    if (rc == 0) {
        rc = peer_call(&p, "GET", "/r1/test", NULL, -1, 0, false, &resp);
        if (rc < 0) {
            const char *step =
                rc == -ECONNREFUSED || rc == -ETIMEDOUT ||
                        rc == -EHOSTUNREACH || rc == -ECONNRESET
                    ? "cannot reach it"
                : rc == -ETIME ? "Kerberos: clocks differ"
                : rc == -EPERM ? "it does not accept this host"
                : rc == -EACCES ? "authentication failed"
                                : "it answered with an error";
            rc = vr_err(rc, "test-connection %s (%s auth): %s: %s", p.server,
                        r.auth, step, vr_errmsg());
        }
    }
    if (rc == 0) {
        *out = resp;
        json_object_object_add(*out, "replica_server",
                               json_object_new_string(p.server));
        json_object_object_add(*out, "auth", json_object_new_string(r.auth));
    }
    peer_fini(&p);
    return rc;
}
