/* tls.h: certificate material — validation, the DNS name a certificate
 * names, thumbprints and the certificate store (tls.c). */
#ifndef VR_TLS_H
#define VR_TLS_H

#include <stdbool.h>

#include "vr.h"

/* Validate certificate material: 0 or -EINVAL with a message. */
int tls_check_material(const char *cert, const char *key, const char *ca) VR_WUR;
/* Is the certificate in cert valid now (not expired, not before its
 * start)?  0, or -EINVAL with a message giving the dates. */
int tls_check_validity(const char *cert) VR_WUR;
/* First DNS SAN of a certificate file / certificate; caller frees. */
char *tls_cert_dns_name(const char *cert_path);
struct gnutls_x509_crt_int;
char *tls_crt_dns_name(struct gnutls_x509_crt_int *crt);
/* A thumbprint as given, normalized to lower-case hex: false unless it is
 * a SHA-1 (40 digits) or SHA-256 (64) one. */
bool tls_thumbprint_norm(const char *in, char out[65]);
/* SHA-1 thumbprint (hex) of a certificate file: 0 or -errno. */
int tls_thumbprint(const char *cert_path, char sha1[41]) VR_WUR;
/* The certificate of DIR (NAME.pem, its key NAME.key) whose SHA-1 or
 * SHA-256 thumbprint is THUMBPRINT: 0 and both paths (caller frees), or
 * -ENOENT/-EINVAL/-EEXIST with a message. */
int tls_find_by_thumbprint(const char *dir, const char *thumbprint,
                           char **cert, char **key) VR_WUR;
/* The CAs ca_pem with their revocation list crl_pem (read from
 * crl_path, named in the message) as a trust list to check client
 * certificates against: 0 and *out, or -EINVAL (*out NULL) when the list
 * is not one the CAs signed. */
struct gnutls_x509_trust_list_st;
int tls_crl_trust_list(const char *ca_pem, const char *crl_pem,
                       const char *crl_path,
                       struct gnutls_x509_trust_list_st **out) VR_WUR;

#endif
