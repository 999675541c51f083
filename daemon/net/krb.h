/* krb.h: Kerberos mode of the Replica protocol (GSSAPI, krb5 mechanism).
 *
 * Every request carries a fresh krb5 AP-REQ in "Authorization: Negotiate"
 * (no mutual-authentication leg, so the context is complete at once and
 * both ends can sign in the same round trip) and a GSS MIC over the
 * request digest — method, path, the protocol headers and SHA-256 of the
 * plaintext body — in "X-Vmreplica-MIC".  The Replica server's answer
 * carries its MIC over the response digest, which is what authenticates
 * the server to the primary.  With encryption the body travels as frames
 * of GSS wrap tokens (confidentiality on) and the request digest, instead
 * of a MIC header, is the plaintext of the last frame: every token the
 * primary makes is then checked in the order it was made (a MIC made
 * before the frames could only be checked after them, out of sequence).
 * Formats: docs/formats.md, "Kerberos mode". */
#ifndef VR_KRB_H
#define VR_KRB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gssapi/gssapi.h>

#define KRB_DIGEST_LEN 32
/* Plaintext bytes per wrap frame, and the largest frame accepted. */
#define KRB_FRAME_PLAIN (256u << 10)
#define KRB_FRAME_MAX   (KRB_FRAME_PLAIN + 4096u)
#define KRB_TOKEN_MAX   (64u << 10) /* an AP-REQ or MIC, decoded */
#define KRB_WRAP_HEADER "X-Vmreplica-Wrap"
#define KRB_WRAP_VALUE  "gss-v1"
#define KRB_MIC_HEADER  "X-Vmreplica-MIC"

/* Digest of a request: the fields, NUL-separated, then SHA-256 of the
 * plaintext body.  NULL fields count as "". */
struct krb_req_fields {
    const char *method, *path, *epoch, *history, *encoding, *wrap;
};
void krb_request_digest(const struct krb_req_fields *f,
                        const uint8_t body_sha[32],
                        uint8_t out[KRB_DIGEST_LEN]);
void krb_response_digest(unsigned status, const uint8_t body_sha[32],
                         uint8_t out[KRB_DIGEST_LEN]);

/* Initiator (primary): acquire host/SELF from KEYTAB (tickets cached in
 * memory; SELF with an '@' is a whole principal name instead) and build
 * the AP-REQ for HTTP/SERVER.  *token_b64 is the value
 * for "Authorization: Negotiate ...".  0 or -errno (message set). */
int krb_client_begin(const char *keytab, const char *self,
                     const char *server, gss_ctx_id_t *ctx,
                     char **token_b64);

/* Acceptor (Replica server).  krb_acceptor_open acquires HTTP/SELF from
 * KEYTAB with its replay cache RCACHE ("file2:PATH"); the handle is
 * shared by all connections. */
int krb_acceptor_open(const char *keytab, const char *self,
                      const char *rcache, gss_cred_id_t *cred);
void krb_acceptor_close(gss_cred_id_t *cred);
/* Accept an AP-REQ (base64).  *fqdn: the primary's host name from its
 * host/FQDN@REALM principal; *principal: the whole principal (both
 * caller frees). */
int krb_accept(gss_cred_id_t cred, const char *token_b64, gss_ctx_id_t *ctx,
               char **principal, char **fqdn);

/* MIC over a digest, base64; and its check. */
int krb_sign(gss_ctx_id_t ctx, const uint8_t digest[KRB_DIGEST_LEN],
             char **mic_b64);
int krb_verify(gss_ctx_id_t ctx, const uint8_t digest[KRB_DIGEST_LEN],
               const char *mic_b64);

/* Encrypted bodies: a sequence of frames, each a 4-byte big-endian length
 * and a GSS wrap token (confidentiality required) of at most
 * KRB_FRAME_PLAIN plaintext bytes; the last one (KRB_FRAME_LAST set in its
 * length) holds the request digest. */
#define KRB_FRAME_LAST 0x80000000u
int krb_wrap_frame(gss_ctx_id_t ctx, const void *plain, size_t len,
                   bool last, uint8_t **frame, size_t *frame_len);

/* Reassembles frames from arbitrary chunks and unwraps them. */
struct krb_unframer {
    uint8_t *buf;
    size_t have, need; /* need: 0 = reading the length */
    uint8_t lenbuf[4];
    size_t lenhave;
    bool last;      /* the frame being read is the last one */
    bool have_last; /* the last frame was read: digest holds its content */
    uint8_t digest[KRB_DIGEST_LEN];
};
/* Feed bytes; sink(ud, plain, len) gets each unwrapped frame (a negative
 * return stops with that error). */
int krb_unframe(struct krb_unframer *u, gss_ctx_id_t ctx, const char *data,
                size_t len, int (*sink)(void *ud, const char *p, size_t n),
                void *ud);
/* At the end of the body: -EPROTO if a frame is incomplete or the last
 * one is missing. */
int krb_unframe_end(const struct krb_unframer *u);
void krb_unframer_free(struct krb_unframer *u);

void krb_ctx_free(gss_ctx_id_t *ctx);

/* base64 helpers (standard alphabet, padded). */
char *krb_b64(const void *p, size_t n);
int krb_unb64(const char *s, size_t max, uint8_t **out, size_t *n);

#endif
