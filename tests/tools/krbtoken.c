/* krbtoken.c: sign one Replica-protocol request in Kerberos mode, for tests
 * that send it themselves (to replay it, or to change its body after it
 * was signed).
 *
 *   krbtoken KEYTAB SELF SERVER METHOD PATH EPOCH HISTORY BODYFILE|-
 *
 * Acquires host/SELF from KEYTAB exactly as vmreplicad does (krb.c), and
 * prints the two headers vmreplicad would send for that request — the
 * "Authorization: Negotiate" AP-REQ for HTTP/SERVER and the MIC over the
 * request digest (no Content-Encoding, no wrap: a JSON request) — one per
 * line, for `curl -H @FILE`.  BODYFILE "-" means an empty body.
 * Exit status 0, 1 on a Kerberos or I/O error (message on stderr), 2 on
 * usage errors. */
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "krb.h"
#include "vr.h"

int
main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: krbtoken KEYTAB SELF SERVER METHOD PATH "
                        "EPOCH HISTORY BODYFILE|-\n");
        return 2;
    }
    char *body = NULL;
    size_t len = 0;
    if (strcmp(argv[8], "-") != 0 &&
        io_read_file(argv[8], 64u << 20, &body, &len) < 0) {
        fprintf(stderr, "krbtoken: %s\n", vr_errmsg());
        return 1;
    }
    gss_ctx_id_t ctx;
    char *tok = NULL, *mic = NULL;
    if (krb_client_begin(argv[1], argv[2], argv[3], &ctx, &tok) < 0) {
        fprintf(stderr, "krbtoken: %s\n", vr_errmsg());
        return 1;
    }
    uint8_t sha[32], digest[KRB_DIGEST_LEN];
    gnutls_hash_fast(GNUTLS_DIG_SHA256, body ? body : "", len, sha);
    struct krb_req_fields f = { .method = argv[4], .path = argv[5],
                                .epoch = argv[6], .history = argv[7] };
    krb_request_digest(&f, sha, digest);
    if (krb_sign(ctx, digest, &mic) < 0) {
        fprintf(stderr, "krbtoken: %s\n", vr_errmsg());
        return 1;
    }
    printf("Authorization: Negotiate %s\n%s: %s\n", tok, KRB_MIC_HEADER, mic);
    krb_ctx_free(&ctx);
    free(tok);
    free(mic);
    free(body);
    return 0;
}
