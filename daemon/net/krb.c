/* krb.c: Kerberos mode of the Replica protocol — see krb.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gssapi/gssapi_ext.h>
#include <gssapi/gssapi_krb5.h>
#include <krb5.h>

#include "krb.h"
#include "vr.h"

/* "what: major text (minor text)" into the thread's error message. */
static int
gss_fail(int rc, const char *what, OM_uint32 major, OM_uint32 minor)
{
    char text[512] = "";
    size_t used = 0;
    /* GSS_S_FAILURE says only "see the minor code": show that alone. */
    bool only_minor = GSS_ROUTINE_ERROR(major) == GSS_S_FAILURE && minor != 0;
    for (int pass = only_minor ? 1 : 0; pass < 2; pass++) {
        OM_uint32 code = pass == 0 ? major : minor;
        int type = pass == 0 ? GSS_C_GSS_CODE : GSS_C_MECH_CODE;
        if (pass == 1 && minor == 0)
            break;
        OM_uint32 ctx = 0, m;
        do {
            gss_buffer_desc b = GSS_C_EMPTY_BUFFER;
            if (GSS_ERROR(gss_display_status(&m, code, type, GSS_C_NO_OID,
                                             &ctx, &b)))
                break;
            int w = 0;
            if (!(b.length == 7 && memcmp(b.value, "Success", 7) == 0))
                w = snprintf(text + used, sizeof text - used, "%s%.*s",
                             used ? (pass == 1 ? ": " : "; ") : "",
                             (int)b.length, (const char *)b.value);
            gss_release_buffer(&m, &b);
            if (w > 0)
                used += (size_t)w < sizeof text - used
                            ? (size_t)w
                            : sizeof text - used - 1;
        } while (ctx != 0);
    }
    /* A ticket or authenticator outside the clock-skew window: say what
     * to do about it. */
    const char *hint = "";
    if (minor == (OM_uint32)KRB5_KDC_UNREACH)
        rc = -EHOSTUNREACH; /* the KDC may come back: retry */
    if (minor == (OM_uint32)KRB5KRB_AP_ERR_SKEW ||
        minor == (OM_uint32)KRB5KRB_AP_ERR_TKT_NYV) {
        rc = -ETIME; /* heals when the clocks do: the primary retries */
        hint = " (the clocks of the primary and the Replica server differ "
               "by more than Kerberos allows, 5 min by default: synchronize "
               "them, e.g. with NTP)";
    }
    return vr_err(rc, "%s: %s%s", what, text[0] ? text : "GSSAPI error",
                  hint);
}

/* --- digests ----------------------------------------------------------- */

static void
hash_str(gnutls_hash_hd_t h, const char *s)
{
    if (s)
        gnutls_hash(h, s, strlen(s));
    gnutls_hash(h, "", 1);
}

void
krb_request_digest(const struct krb_req_fields *f, const uint8_t body_sha[32],
                   uint8_t out[KRB_DIGEST_LEN])
{
    gnutls_hash_hd_t h;
    if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0)
        abort();
    hash_str(h, "vmreplica-krb1-request");
    hash_str(h, f->method);
    hash_str(h, f->path);
    hash_str(h, f->epoch);
    hash_str(h, f->history);
    hash_str(h, f->encoding);
    hash_str(h, f->wrap);
    gnutls_hash(h, body_sha, 32);
    gnutls_hash_deinit(h, out);
}

void
krb_response_digest(unsigned status, const uint8_t body_sha[32],
                    uint8_t out[KRB_DIGEST_LEN])
{
    char s[16];
    snprintf(s, sizeof s, "%u", status);
    gnutls_hash_hd_t h;
    if (gnutls_hash_init(&h, GNUTLS_DIG_SHA256) < 0)
        abort();
    hash_str(h, "vmreplica-krb1-response");
    hash_str(h, s);
    gnutls_hash(h, body_sha, 32);
    gnutls_hash_deinit(h, out);
}

/* --- base64 -------------------------------------------------------------- */

char *
krb_b64(const void *p, size_t n)
{
    gnutls_datum_t in = { (unsigned char *)p, (unsigned)n }, out;
    if (n > UINT32_MAX / 2 || gnutls_base64_encode2(&in, &out) < 0)
        abort();
    char *s = xmalloc(out.size + 1);
    memcpy(s, out.data, out.size);
    s[out.size] = '\0';
    gnutls_free(out.data);
    return s;
}

int
krb_unb64(const char *s, size_t max, uint8_t **out, size_t *n)
{
    size_t len = strlen(s);
    if (len == 0 || len > (max / 3 + 1) * 4)
        return vr_err(-EINVAL, "base64 value empty or longer than %zu "
                      "bytes", max);
    gnutls_datum_t in = { (unsigned char *)s, (unsigned)len }, dec;
    if (gnutls_base64_decode2(&in, &dec) < 0)
        return vr_err(-EINVAL, "bad base64");
    *out = xmalloc(dec.size ? dec.size : 1);
    memcpy(*out, dec.data, dec.size);
    *n = dec.size;
    gnutls_free(dec.data);
    return 0;
}

/* --- names and credentials ---------------------------------------------- */

static int
import_service(const char *service, const char *host, gss_name_t *name)
{
    char *s = xasprintf("%s@%s", service, host);
    gss_buffer_desc b = { strlen(s), s };
    OM_uint32 minor, major =
        gss_import_name(&minor, &b, GSS_C_NT_HOSTBASED_SERVICE, name);
    int rc = 0;
    if (GSS_ERROR(major))
        rc = gss_fail(-EINVAL, s, major, minor);
    free(s);
    return rc;
}

static gss_OID_set_desc krb5_mechs = { 1, NULL };

static gss_OID_set
mechs(void)
{
    krb5_mechs.elements = (gss_OID)gss_mech_krb5;
    return &krb5_mechs;
}

int
krb_client_begin(const char *keytab, const char *self, const char *server,
                 gss_ctx_id_t *ctx, char **token_b64)
{
    *ctx = GSS_C_NO_CONTEXT;
    *token_b64 = NULL;
    if (!keytab || !self)
        return vr_err(-EINVAL, "kerberos: this host has no keytab or host "
                               "name (server set --keytab, --hostname)");
    gss_name_t me = GSS_C_NO_NAME, target = GSS_C_NO_NAME;
    gss_cred_id_t cred = GSS_C_NO_CREDENTIAL;
    OM_uint32 minor, major;
    int rc = 0;
    if (strchr(self, '@')) {
        /* A principal name (tests: a user's keytab). */
        gss_buffer_desc b = { strlen(self), (void *)self };
        major = gss_import_name(&minor, &b, GSS_KRB5_NT_PRINCIPAL_NAME, &me);
        if (GSS_ERROR(major))
            rc = gss_fail(-EINVAL, self, major, minor);
    } else {
        rc = import_service("host", self, &me);
    }
    if (rc == 0)
        rc = import_service("HTTP", server, &target);
    if (rc == 0) {
        /* Tickets live in a memory cache of this process, filled from the
         * keytab when needed and renewed by the library. */
        gss_key_value_element_desc el[] = {
            { "client_keytab", keytab },
            { "ccache", "MEMORY:vmreplicad" },
        };
        gss_key_value_set_desc store = { ARRAY_SIZE(el), el };
        major = gss_acquire_cred_from(&minor, me, GSS_C_INDEFINITE, mechs(),
                                      GSS_C_INITIATE, &store, &cred, NULL,
                                      NULL);
        if (GSS_ERROR(major)) {
            char what[600];
            snprintf(what, sizeof what, "kerberos: credentials for host/%s "
                     "from %s", self, keytab);
            rc = gss_fail(-EACCES, what, major, minor);
        }
    }
    gss_buffer_desc out = GSS_C_EMPTY_BUFFER;
    if (rc == 0) {
        major = gss_init_sec_context(
            &minor, cred, ctx, target, (gss_OID)gss_mech_krb5,
            GSS_C_INTEG_FLAG | GSS_C_CONF_FLAG | GSS_C_REPLAY_FLAG |
                GSS_C_SEQUENCE_FLAG,
            0, GSS_C_NO_CHANNEL_BINDINGS, GSS_C_NO_BUFFER, NULL, &out, NULL,
            NULL);
        if (GSS_ERROR(major)) {
            char what[300];
            snprintf(what, sizeof what, "kerberos: ticket for HTTP/%s",
                     server);
            rc = gss_fail(-EACCES, what, major, minor);
        } else if (major != GSS_S_COMPLETE) {
            rc = vr_err(-EPROTO, "kerberos: context not complete after one "
                                 "token");
        } else {
            *token_b64 = krb_b64(out.value, out.length);
        }
        gss_release_buffer(&minor, &out);
    }
    if (rc < 0)
        krb_ctx_free(ctx);
    gss_release_cred(&minor, &cred);
    gss_release_name(&minor, &me);
    gss_release_name(&minor, &target);
    return rc;
}

int
krb_acceptor_open(const char *keytab, const char *self, const char *rcache,
                  gss_cred_id_t *cred)
{
    *cred = GSS_C_NO_CREDENTIAL;
    if (!keytab || !self)
        return vr_err(-EINVAL, "kerberos: a keytab and this server's host "
                               "name are required");
    gss_name_t me = GSS_C_NO_NAME;
    int rc = import_service("HTTP", self, &me);
    if (rc < 0)
        return rc;
    gss_key_value_element_desc el[] = {
        { "keytab", keytab },
        { "rcache", rcache },
    };
    gss_key_value_set_desc store = { ARRAY_SIZE(el), el };
    OM_uint32 minor, major = gss_acquire_cred_from(
        &minor, me, GSS_C_INDEFINITE, mechs(), GSS_C_ACCEPT, &store, cred,
        NULL, NULL);
    if (GSS_ERROR(major)) {
        char what[512];
        snprintf(what, sizeof what, "kerberos: keytab %s: HTTP/%s", keytab,
                 self);
        rc = gss_fail(-EINVAL, what, major, minor);
    }
    gss_release_name(&minor, &me);
    return rc;
}

void
krb_acceptor_close(gss_cred_id_t *cred)
{
    OM_uint32 minor;
    gss_release_cred(&minor, cred);
}

int
krb_accept(gss_cred_id_t cred, const char *token_b64, gss_ctx_id_t *ctx,
           char **principal, char **fqdn)
{
    *ctx = GSS_C_NO_CONTEXT;
    *principal = *fqdn = NULL;
    uint8_t *tok;
    size_t n;
    if (krb_unb64(token_b64, KRB_TOKEN_MAX, &tok, &n) < 0)
        return vr_err(-EACCES, "kerberos: bad Negotiate token: %s",
                      vr_errmsg());
    gss_buffer_desc in = { n, tok }, out = GSS_C_EMPTY_BUFFER;
    gss_name_t src = GSS_C_NO_NAME;
    OM_uint32 minor, flags = 0;
    OM_uint32 major =
        gss_accept_sec_context(&minor, ctx, cred, &in,
                               GSS_C_NO_CHANNEL_BINDINGS, &src, NULL, &out,
                               &flags, NULL, NULL);
    OM_uint32 m2;
    gss_release_buffer(&m2, &out);
    int rc = 0;
    /* A SPNEGO token (RFC 4178: OID 1.3.6.1.5.5.2 after the tag and
     * length) where a plain krb5 one is expected. */
    static const uint8_t spnego[] = { 0x06, 0x06, 0x2b, 0x06, 0x01,
                                      0x05, 0x05, 0x02 };
    bool is_spnego = n > 12 && (memcmp(tok + 2, spnego, sizeof spnego) == 0 ||
                                memcmp(tok + 4, spnego, sizeof spnego) == 0);
    free(tok);
    if (GSS_ERROR(major) && is_spnego)
        rc = vr_err(-EACCES, "kerberos: a SPNEGO token; vmreplica takes a "
                             "krb5 token (RFC 4121) in 'Authorization: "
                             "Negotiate'");
    else if (GSS_ERROR(major))
        rc = gss_fail(-EACCES, "kerberos", major, minor);
    else if (major != GSS_S_COMPLETE)
        rc = vr_err(-EACCES, "kerberos: a one-token krb5 context is "
                             "required (SPNEGO negotiation is not used)");
    else if (!(flags & GSS_C_INTEG_FLAG) || !(flags & GSS_C_REPLAY_FLAG))
        rc = vr_err(-EACCES, "kerberos: the client did not ask for "
                             "integrity and replay protection");
    gss_buffer_desc name = GSS_C_EMPTY_BUFFER;
    if (rc == 0) {
        major = gss_display_name(&minor, src, &name, NULL);
        if (GSS_ERROR(major))
            rc = gss_fail(-EACCES, "kerberos: client name", major, minor);
    }
    if (rc == 0) {
        char *p = xstrndup(name.value, name.length);
        /* host/FQDN@REALM: the primary's identity is FQDN. */
        const char *at = strrchr(p, '@');
        size_t hl = at ? (size_t)(at - p) : strlen(p);
        if (strncmp(p, "host/", 5) != 0 || hl <= 5 ||
            memchr(p + 5, '/', hl - 5) != NULL) {
            rc = vr_err(-EACCES, "kerberos: principal %s is not a host "
                                 "principal (host/FQDN)", p);
        } else {
            char *h = xstrndup(p + 5, hl - 5);
            if (!vr_fqdn_valid(h)) {
                rc = vr_err(-EACCES, "kerberos: principal %s does not name "
                                     "a valid host", p);
                free(h);
            } else {
                *fqdn = h;
            }
        }
        *principal = p;
    }
    gss_release_buffer(&minor, &name);
    gss_release_name(&minor, &src);
    if (rc < 0)
        krb_ctx_free(ctx);
    return rc;
}

/* --- MIC ------------------------------------------------------------------ */

int
krb_sign(gss_ctx_id_t ctx, const uint8_t digest[KRB_DIGEST_LEN],
         char **mic_b64)
{
    gss_buffer_desc msg = { KRB_DIGEST_LEN, (void *)digest };
    gss_buffer_desc mic = GSS_C_EMPTY_BUFFER;
    OM_uint32 minor, major =
        gss_get_mic(&minor, ctx, GSS_C_QOP_DEFAULT, &msg, &mic);
    if (GSS_ERROR(major))
        return gss_fail(-EIO, "kerberos: sign", major, minor);
    *mic_b64 = krb_b64(mic.value, mic.length);
    gss_release_buffer(&minor, &mic);
    return 0;
}

int
krb_verify(gss_ctx_id_t ctx, const uint8_t digest[KRB_DIGEST_LEN],
           const char *mic_b64)
{
    if (!mic_b64)
        return vr_err(-EACCES, "kerberos: no %s header: the body is not "
                               "signed", KRB_MIC_HEADER);
    uint8_t *tok;
    size_t n;
    if (krb_unb64(mic_b64, KRB_TOKEN_MAX, &tok, &n) < 0)
        return vr_err(-EACCES, "kerberos: bad %s: %s", KRB_MIC_HEADER,
                      vr_errmsg());
    gss_buffer_desc msg = { KRB_DIGEST_LEN, (void *)digest };
    gss_buffer_desc mic = { n, tok };
    OM_uint32 minor, major = gss_verify_mic(&minor, ctx, &msg, &mic, NULL);
    free(tok);
    if (major != GSS_S_COMPLETE)
        return gss_fail(-EACCES, "kerberos: message integrity check failed",
                        major, minor);
    return 0;
}

/* --- wrap frames ------------------------------------------------------- */

int
krb_wrap_frame(gss_ctx_id_t ctx, const void *plain, size_t len, bool last,
               uint8_t **frame, size_t *frame_len)
{
    if (len > KRB_FRAME_PLAIN)
        return vr_err(-EINVAL, "kerberos: frame of %zu bytes", len);
    gss_buffer_desc in = { len, (void *)plain }, out = GSS_C_EMPTY_BUFFER;
    int conf = 0;
    OM_uint32 minor, major =
        gss_wrap(&minor, ctx, 1, GSS_C_QOP_DEFAULT, &in, &conf, &out);
    if (GSS_ERROR(major))
        return gss_fail(-EIO, "kerberos: wrap", major, minor);
    if (!conf || out.length > KRB_FRAME_MAX) {
        gss_release_buffer(&minor, &out);
        return vr_err(-EIO, "kerberos: wrap without confidentiality");
    }
    *frame_len = 4 + out.length;
    *frame = xmalloc(*frame_len);
    (*frame)[0] = (uint8_t)(out.length >> 24 | (last ? 0x80 : 0));
    (*frame)[1] = (uint8_t)(out.length >> 16);
    (*frame)[2] = (uint8_t)(out.length >> 8);
    (*frame)[3] = (uint8_t)out.length;
    memcpy(*frame + 4, out.value, out.length);
    gss_release_buffer(&minor, &out);
    return 0;
}

/* Move bytes from *data into dst until it holds want: true once it does. */
static bool
take(uint8_t *dst, size_t *have, size_t want, const char **data, size_t *len)
{
    size_t k = want - *have < *len ? want - *have : *len;
    memcpy(dst + *have, *data, k);
    *have += k;
    *data += k;
    *len -= k;
    return *have == want;
}

int
krb_unframe(struct krb_unframer *u, gss_ctx_id_t ctx, const char *data,
            size_t len, int (*sink)(void *ud, const char *p, size_t n),
            void *ud)
{
    while (len > 0) {
        if (u->have_last)
            return vr_err(-EPROTO, "kerberos: data after the last frame");
        if (u->need == 0) {
            if (!take(u->lenbuf, &u->lenhave, 4, &data, &len))
                break;
            uint32_t fl = (uint32_t)u->lenbuf[0] << 24 |
                          (uint32_t)u->lenbuf[1] << 16 |
                          (uint32_t)u->lenbuf[2] << 8 | u->lenbuf[3];
            u->lenhave = 0;
            u->last = (fl & KRB_FRAME_LAST) != 0;
            fl &= ~KRB_FRAME_LAST;
            if (fl == 0 || fl > KRB_FRAME_MAX)
                return vr_err(-EPROTO, "kerberos: wrap frame of %u bytes "
                                       "(at most %u)", fl, KRB_FRAME_MAX);
            u->need = fl;
            u->have = 0;
            if (!u->buf)
                u->buf = xmalloc(KRB_FRAME_MAX);
            continue;
        }
        if (!take(u->buf, &u->have, u->need, &data, &len))
            break;
        gss_buffer_desc in = { u->need, u->buf }, out = GSS_C_EMPTY_BUFFER;
        int conf = 0;
        OM_uint32 minor, major =
            gss_unwrap(&minor, ctx, &in, &out, &conf, NULL);
        u->need = 0;
        if (major != GSS_S_COMPLETE)
            return gss_fail(-EACCES, "kerberos: unwrap", major, minor);
        int rc = 0;
        if (!conf)
            rc = vr_err(-EACCES, "kerberos: a frame was not encrypted");
        else if (!u->last)
            rc = sink(ud, out.value, out.length);
        else if (out.length != KRB_DIGEST_LEN)
            rc = vr_err(-EPROTO, "kerberos: the last frame is not a digest");
        else {
            memcpy(u->digest, out.value, KRB_DIGEST_LEN);
            u->have_last = true;
        }
        gss_release_buffer(&minor, &out);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int
krb_unframe_end(const struct krb_unframer *u)
{
    if (u->need != 0 || u->lenhave != 0)
        return vr_err(-EPROTO, "kerberos: body ends inside a wrap frame");
    if (!u->have_last)
        return vr_err(-EACCES, "kerberos: body ends without its last "
                               "(signed digest) frame");
    return 0;
}

void
krb_unframer_free(struct krb_unframer *u)
{
    free(u->buf);
    memset(u, 0, sizeof *u);
}

void
krb_ctx_free(gss_ctx_id_t *ctx)
{
    OM_uint32 minor;
    if (*ctx != GSS_C_NO_CONTEXT)
        gss_delete_sec_context(&minor, ctx, GSS_C_NO_BUFFER);
    *ctx = GSS_C_NO_CONTEXT;
}
