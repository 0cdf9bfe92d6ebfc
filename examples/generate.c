/*
 * generate: the smallest program on the C API (include/diffuse.h).
 *
 *     generate MODEL PROMPT OUT.png [SEED]
 *
 * Loads MODEL (.safetensors, .ckpt or a diffusers folder), generates one image at the model's
 * native size with the defaults (20 steps of Euler a, CFG 7) and writes it as a PNG carrying
 * A1111's "parameters" text. Without SEED the seed is random; it is printed either way.
 */
#include <diffuse.h>

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    struct diffuse_context *ctx = NULL;
    struct diffuse_result *res = NULL;
    struct diffuse_params p;
    const unsigned char *png;
    size_t size = 0;
    diffuse_status st;
    FILE *f = NULL;
    int ok;

    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s MODEL PROMPT OUT.png [SEED]\n", argv[0]);
        return 2;
    }
    st = diffuse_init_from_file(argv[1], diffuse_context_default_params(), &ctx);
    if (st != DIFFUSE_OK) {
        fprintf(stderr, "error: %s\n", diffuse_last_error());
        return 1;
    }

    p = diffuse_default_params();
    p.prompt = argv[2];
    if (argc == 5) p.seed = strtoll(argv[4], NULL, 10);
    st = diffuse_generate(ctx, NULL, &p, &res);
    if (st != DIFFUSE_OK) {
        fprintf(stderr, "error: %s: %s\n", diffuse_status_string(st), diffuse_last_error());
        diffuse_free(ctx);
        return 1;
    }

    png = diffuse_result_png(res, 0, &size);
    ok = png != NULL && (f = fopen(argv[3], "wb")) != NULL;
    if (ok) {
        ok = fwrite(png, 1, size, f) == size;
        ok = fclose(f) == 0 && ok;
    }
    if (ok)
        printf("wrote %s (seed %llu)\n", argv[3], (unsigned long long)diffuse_result_seed(res, 0));
    else
        fprintf(stderr, "error: cannot write %s\n", argv[3]);

    diffuse_result_free(res);
    diffuse_free(ctx);
    return ok ? 0 : 1;
}
