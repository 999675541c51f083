/* tls.c: this host's TLS material — checking a certificate and key pair,
 * the host name a certificate carries, and finding a certificate by its
 * thumbprint in a directory of them (--certificate-thumbprint). */
#include <dirent.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tls.h"

int
tls_crl_trust_list(const char *ca_pem, const char *crl_pem,
                   const char *crl_path, gnutls_x509_trust_list_t *out)
{
    /* The CRL is checked against the CAs: one they did not sign is
     * refused here, not ignored later. */
    gnutls_datum_t ca = { (unsigned char *)ca_pem, (unsigned)strlen(ca_pem) };
    gnutls_datum_t crl = { (unsigned char *)crl_pem,
                           (unsigned)strlen(crl_pem) };
    gnutls_x509_trust_list_init(out, 0);
    int r = gnutls_x509_trust_list_add_trust_mem(*out, &ca, NULL,
                                                 GNUTLS_X509_FMT_PEM, 0, 0);
    if (r > 0)
        r = gnutls_x509_trust_list_add_trust_mem(
            *out, NULL, &crl, GNUTLS_X509_FMT_PEM,
            GNUTLS_TL_VERIFY_CRL | GNUTLS_TL_FAIL_ON_INVALID_CRL, 0);
    if (r > 0)
        return 0;
    gnutls_x509_trust_list_deinit(*out, 1);
    *out = NULL;
    return vr_err(-EINVAL, "crl %s: %s", crl_path,
                  r < 0 ? gnutls_strerror(r)
                        : "no revocation list signed by the ca");
}

int
tls_check_material(const char *cert, const char *key, const char *ca)
{
    if (!cert || !key || !ca)
        return vr_err(-EINVAL, "certificate, key and ca must be given "
                               "together");
    gnutls_certificate_credentials_t cr;
    gnutls_certificate_allocate_credentials(&cr);
    int r = gnutls_certificate_set_x509_key_file(cr, cert, key,
                                                 GNUTLS_X509_FMT_PEM);
    int rc = 0;
    if (r < 0)
        rc = vr_err(-EINVAL, "certificate %s / key %s: %s", cert, key,
                    gnutls_strerror(r));
    else if ((r = gnutls_certificate_set_x509_trust_file(
                  cr, ca, GNUTLS_X509_FMT_PEM)) <= 0)
        rc = vr_err(-EINVAL, "ca %s: %s", ca,
                    r < 0 ? gnutls_strerror(r) : "no certificate found");
    gnutls_certificate_free_credentials(cr);
    return rc;
}

int
tls_check_validity(const char *cert)
{
    gnutls_datum_t pem = { NULL, 0 };
    if (gnutls_load_file(cert, &pem) < 0)
        return vr_err(-EINVAL, "certificate %s: cannot read it", cert);
    gnutls_x509_crt_t crt;
    gnutls_x509_crt_init(&crt);
    int rc = 0;
    if (gnutls_x509_crt_import(crt, &pem, GNUTLS_X509_FMT_PEM) < 0) {
        rc = vr_err(-EINVAL, "certificate %s: not a PEM certificate", cert);
    } else {
        time_t now = time(NULL);
        time_t from = gnutls_x509_crt_get_activation_time(crt);
        time_t until = gnutls_x509_crt_get_expiration_time(crt);
        char a[32], b[32], n[32];
        vr_rfc3339((uint64_t)from * 1000, a);
        vr_rfc3339((uint64_t)until * 1000, b);
        vr_rfc3339((uint64_t)now * 1000, n);
        if (until != (time_t)-1 && now > until)
            rc = vr_err(-EINVAL, "certificate %s: expired on %s (now %s): "
                        "peers would refuse it; give a valid one", cert, b,
                        n);
        else if (from != (time_t)-1 && now < from)
            rc = vr_err(-EINVAL, "certificate %s: not valid before %s (now "
                        "%s): peers would refuse it; check this host's "
                        "clock or give a valid one", cert, a, n);
    }
    gnutls_x509_crt_deinit(crt);
    gnutls_free(pem.data);
    return rc;
}

char *
tls_crt_dns_name(gnutls_x509_crt_t crt)
{
    for (unsigned i = 0; i < 64; i++) {
        char name[256];
        size_t sz = sizeof name;
        int t = gnutls_x509_crt_get_subject_alt_name(crt, i, name, &sz, NULL);
        if (t < 0)
            break;
        if (t == GNUTLS_SAN_DNSNAME && sz < sizeof name) {
            name[sz] = '\0';
            return xstrdup(name);
        }
    }
    return NULL;
}

char *
tls_cert_dns_name(const char *cert_path)
{
    gnutls_datum_t pem = { NULL, 0 };
    if (gnutls_load_file(cert_path, &pem) < 0)
        return NULL;
    gnutls_x509_crt_t crt;
    gnutls_x509_crt_init(&crt);
    char *name = NULL;
    if (gnutls_x509_crt_import(crt, &pem, GNUTLS_X509_FMT_PEM) >= 0)
        name = tls_crt_dns_name(crt);
    gnutls_x509_crt_deinit(crt);
    gnutls_free(pem.data);
    return name;
}

/* "hex" lower case, no separators, of the SHA-1 (40) or SHA-256 (64)
 * fingerprint the caller gives in any common spelling ("AB:CD…", "ab cd",
 * …); false if it is neither. */
bool
tls_thumbprint_norm(const char *in, char out[65])
{
    size_t n = 0;
    for (const char *p = in; *p; p++) {
        if (*p == ':' || *p == ' ' || *p == '-')
            continue;
        char c = *p >= 'A' && *p <= 'F' ? (char)(*p - 'A' + 'a') : *p;
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) || n >= 64)
            return false;
        out[n++] = c;
    }
    out[n] = '\0';
    return n == 40 || n == 64;
}

/* The SHA-1 and SHA-256 thumbprints of the first certificate in a PEM
 * file. */
static int
file_thumbprints(const char *path, char sha1[41], char sha256[65])
{
    gnutls_datum_t pem = { NULL, 0 };
    if (gnutls_load_file(path, &pem) < 0)
        return -EIO;
    gnutls_x509_crt_t crt;
    gnutls_x509_crt_init(&crt);
    int rc = gnutls_x509_crt_import(crt, &pem, GNUTLS_X509_FMT_PEM) < 0 ? -EINVAL
                                                                       : 0;
    unsigned char md[32];
    size_t sz;
    for (int k = 0; rc == 0 && k < 2; k++) {
        sz = sizeof md;
        if (gnutls_x509_crt_get_fingerprint(
                crt, k == 0 ? GNUTLS_DIG_SHA1 : GNUTLS_DIG_SHA256, md, &sz) <
            0) {
            rc = -EINVAL;
            break;
        }
        char *out = k == 0 ? sha1 : sha256;
        for (size_t i = 0; i < sz; i++)
            snprintf(out + 2 * i, 3, "%02x", md[i]);
    }
    gnutls_x509_crt_deinit(crt);
    gnutls_free(pem.data);
    return rc;
}

int
tls_thumbprint(const char *cert_path, char sha1[41])
{
    char sha256[65];
    return file_thumbprints(cert_path, sha1, sha256);
}

int
tls_find_by_thumbprint(const char *dir, const char *thumbprint, char **cert,
                       char **key)
{
    char want[65];
    *cert = *key = NULL;
    if (!tls_thumbprint_norm(thumbprint, want))
        return vr_err(-EINVAL, "certificate thumbprint %s: expected 40 (SHA-1)"
                      " or 64 (SHA-256) hexadecimal digits", thumbprint);
    DIR *d = opendir(dir);
    if (!d)
        return vr_err(-errno, "certificate store %s: %s", dir,
                      strerror(errno));
    struct dirent *de;
    unsigned seen = 0;
    int rc = 0;
    while ((de = readdir(d)) && rc == 0) {
        size_t n = strlen(de->d_name);
        if (n < 5 || strcmp(de->d_name + n - 4, ".pem") != 0 ||
            de->d_name[0] == '.')
            continue;
        CLEANUP_FREE char *c = xasprintf("%s/%s", dir, de->d_name);
        char sha1[41], sha256[65];
        if (file_thumbprints(c, sha1, sha256) < 0)
            continue; /* not a certificate: a key, a CA bundle… */
        seen++;
        if (strcmp(want, sha1) != 0 && strcmp(want, sha256) != 0)
            continue;
        if (*cert) {
            rc = vr_err(-EEXIST, "certificate store %s: thumbprint %s is "
                        "in both %s and %s", dir, thumbprint, *cert, c);
            break;
        }
        *cert = xstrdup(c);
        *key = xasprintf("%s/%.*s.key", dir, (int)(n - 4), de->d_name);
    }
    closedir(d);
    if (rc == 0 && !*cert)
        rc = vr_err(-ENOENT, "certificate store %s: none of its %u "
                    "certificates has thumbprint %s", dir, seen, thumbprint);
    if (rc < 0) {
        free(*cert);
        free(*key);
        *cert = *key = NULL;
    }
    return rc;
}
