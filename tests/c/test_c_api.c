/*
 * The C API (include/diffuse.h) from C, against the CLI: the tiny sd1 model at 64x64, 2 Euler steps,
 * seed 1, CFG 7 through diffuse_generate() gives exactly the pixels of `diffuse generate` with the
 * same settings (its PNG decoded here with libpng) and the same "parameters" text. Also: seeds of a
 * batch, progress callbacks and cancellation, errors (missing model, bad width) with their
 * messages, diffuse_result_png, and a reused diffuse_state giving the same image twice.
 *
 * Usage: test_c_api DIFFUSE_BIN MODEL TMPDIR. Exit 0: passed; 1: failed (reasons on stderr);
 * 77: skipped (the model is absent). Its files go to a new folder in TMPDIR, removed if it passes.
 */
#define _XOPEN_SOURCE 700 /* mkdtemp, setenv, nftw */

#include <diffuse.h>
#include <png.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int n_checks = 0, n_failures = 0;

/* CHECK(cond, fmt, ...): counts the check; on failure prints where, what and why. */
#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        ++n_checks;                                                               \
        if (!(cond)) {                                                            \
            ++n_failures;                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
        }                                                                         \
    } while (0)

static const char *const kPrompt = "a photograph of an astronaut riding a horse";
static const char *const kNegative = "blurry";

/* ---- progress callback: records every call, optionally cancels ---- */

#define MAX_CALLS 64
struct progress_log {
    int n;
    int stage[MAX_CALLS], done[MAX_CALLS], total[MAX_CALLS];
    int cancel_at_denoise; /* > 0: return nonzero at this denoise step */
};

static int on_progress(enum diffuse_stage stage, int done, int total, void *user_data) {
    struct progress_log *log = (struct progress_log *)user_data;
    if (log->n < MAX_CALLS) {
        log->stage[log->n] = (int)stage;
        log->done[log->n] = done;
        log->total[log->n] = total;
    }
    ++log->n;
    return log->cancel_at_denoise > 0 && stage == DIFFUSE_STAGE_DENOISE && done == log->cancel_at_denoise;
}

/* ---- PNG decoding (libpng), from memory ---- */

struct png_decoded {
    int width, height, channels;
    unsigned char *pixels;  /* rows of width*channels bytes */
    char *parameters;       /* the "parameters" text chunk, NULL if none */
    char error[256];
};

struct mem_reader {
    const unsigned char *data;
    size_t size, pos;
};

static void mem_read(png_structp png, png_bytep out, png_size_t n) {
    struct mem_reader *r = (struct mem_reader *)png_get_io_ptr(png);
    if (n > r->size - r->pos) png_error(png, "truncated PNG");
    memcpy(out, r->data + r->pos, n);
    r->pos += n;
}

/* Decodes an 8-bit grey/RGB/RGBA PNG; returns 0 on success, else -1 with out->error set. */
static int decode_png(const unsigned char *data, size_t size, struct png_decoded *out) {
    struct mem_reader reader = {data, size, 0};
    png_structp png = NULL;
    png_infop info = NULL;
    memset(out, 0, sizeof *out);
    png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    if (png) info = png_create_info_struct(png);
    if (!png || !info) {
        snprintf(out->error, sizeof out->error, "libpng: out of memory");
        png_destroy_read_struct(&png, &info, NULL);
        return -1;
    }
    if (setjmp(png_jmpbuf(png))) {
        snprintf(out->error, sizeof out->error, "libpng could not decode the PNG");
        free(out->pixels);
        free(out->parameters);
        out->pixels = NULL;
        out->parameters = NULL;
        png_destroy_read_struct(&png, &info, NULL);
        return -1;
    }
    png_set_read_fn(png, &reader, mem_read);
    png_read_png(png, info, PNG_TRANSFORM_IDENTITY, NULL);
    if (png_get_bit_depth(png, info) != 8 || png_get_interlace_type(png, info) != PNG_INTERLACE_NONE) {
        snprintf(out->error, sizeof out->error, "not an 8-bit non-interlaced PNG");
        png_destroy_read_struct(&png, &info, NULL);
        return -1;
    }
    out->width = (int)png_get_image_width(png, info);
    out->height = (int)png_get_image_height(png, info);
    out->channels = (int)png_get_channels(png, info);
    {
        const size_t rowbytes = (size_t)out->width * (size_t)out->channels;
        png_bytepp rows = png_get_rows(png, info);
        int y;
        out->pixels = (unsigned char *)malloc(rowbytes * (size_t)out->height + 1);
        if (!out->pixels) png_error(png, "out of memory");
        for (y = 0; y < out->height; ++y) memcpy(out->pixels + (size_t)y * rowbytes, rows[y], rowbytes);
    }
    {
        png_textp text = NULL;
        int n = 0, i;
        png_get_text(png, info, &text, &n);
        for (i = 0; i < n; ++i) {
            if (strcmp(text[i].key, "parameters") != 0) continue;
            {
                const size_t len = text[i].compression > 0 ? text[i].itxt_length : text[i].text_length;
                out->parameters = (char *)malloc(len + 1);
                if (!out->parameters) png_error(png, "out of memory");
                memcpy(out->parameters, text[i].text, len);
                out->parameters[len] = '\0';
            }
            break;
        }
    }
    png_destroy_read_struct(&png, &info, NULL);
    return 0;
}

static void png_decoded_free(struct png_decoded *d) {
    free(d->pixels);
    free(d->parameters);
    d->pixels = NULL;
    d->parameters = NULL;
}

/* The whole file in a malloc'd buffer, or NULL. */
static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!f) return NULL;
    for (;;) {
        size_t got;
        if (n == cap) {
            unsigned char *grown;
            cap = cap ? cap * 2 : 65536;
            grown = (unsigned char *)realloc(buf, cap);
            if (!grown) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = grown;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    fclose(f);
    *size = n;
    return buf;
}

/* Runs argv[0] with argv, stdout and stderr into log_path; returns the exit status (-1: killed,
 * could not start). */
static int run_process(char *const argv[], const char *log_path) {
    int status = 0;
    pid_t pid;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        alarm(600); /* a hang ends as SIGALRM, reported as a failure */
        execv(argv[0], argv);
        _exit(127);
    }
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void print_file(const char *path) {
    size_t n = 0;
    unsigned char *b = read_file(path, &n);
    if (!b) return;
    fwrite(b, 1, n, stderr);
    free(b);
}

static int remove_entry(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(path);
}

static struct diffuse_params base_params(void) {
    struct diffuse_params p = diffuse_default_params();
    p.prompt = kPrompt;
    p.negative_prompt = kNegative;
    p.width = 64;
    p.height = 64;
    p.steps = 2;
    p.seed = 1;
    p.sampler = "euler";
    p.cfg_scale = 7.0f;
    return p;
}

/* Number of differing bytes between two n-byte buffers; *max_diff gets the largest |a - b|. */
static size_t count_diff(const unsigned char *a, const unsigned char *b, size_t n, int *max_diff) {
    size_t i, diff = 0;
    *max_diff = 0;
    for (i = 0; i < n; ++i) {
        const int d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        if (d) ++diff;
        if (d > *max_diff) *max_diff = d;
    }
    return diff;
}

int main(int argc, char **argv) {
    const char *bin, *model, *tmp_base;
    char tmp[4096], path[4200], log_path[4200], missing[4200];
    struct diffuse_context *ctx = NULL;
    struct diffuse_result *res = NULL;
    struct diffuse_params p;
    struct progress_log log;
    diffuse_status st;
    const unsigned char *rgb = NULL;
    int w = 0, h = 0, i;
    size_t npix_bytes = 64 * 64 * 3, cli_equal_bytes = 0;
    int cli_compared = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: %s DIFFUSE_BIN MODEL TMPDIR\n", argv[0]);
        return 2;
    }
    bin = argv[1];
    model = argv[2];
    tmp_base = argv[3];
    if (access(model, R_OK) != 0) {
        printf("SKIPPED: the tiny sd1 model %s is absent\n", model);
        return 77;
    }
    if (mkdir(tmp_base, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "cannot create %s: %s\n", tmp_base, strerror(errno));
        return 1;
    }
    snprintf(tmp, sizeof tmp, "%s/c_api_XXXXXX", tmp_base);
    if (!mkdtemp(tmp)) {
        fprintf(stderr, "cannot create a folder in %s: %s\n", tmp_base, strerror(errno));
        return 1;
    }
    /* The model-hash cache of both the CLI and the library goes to the test's folder. */
    snprintf(path, sizeof path, "%s/cache", tmp);
    setenv("DIFFUSE_CACHE_DIR", path, 1);

    CHECK(diffuse_version() && *diffuse_version(), "diffuse_version() is empty");
    CHECK(strcmp(diffuse_status_string(DIFFUSE_ERR_CANCELLED), "cancelled") == 0, "status string '%s'",
          diffuse_status_string(DIFFUSE_ERR_CANCELLED));

    /* A missing model is a file error naming the path. */
    snprintf(missing, sizeof missing, "%s/no-such-model.safetensors", tmp);
    st = diffuse_init_from_file(missing, diffuse_context_default_params(), &ctx);
    CHECK(st == DIFFUSE_ERR_FILE, "missing model: status %d (%s), expected DIFFUSE_ERR_FILE; error: %s", (int)st,
          diffuse_status_string(st), diffuse_last_error());
    CHECK(ctx == NULL, "missing model: *out is not NULL");
    CHECK(strstr(diffuse_last_error(), missing) != NULL, "missing model: the error does not name %s: '%s'", missing,
          diffuse_last_error());

    st = diffuse_init_from_file(model, diffuse_context_default_params(), &ctx);
    if (st != DIFFUSE_OK) {
        fprintf(stderr, "FAIL: diffuse_init_from_file(%s): %s: %s\n", model, diffuse_status_string(st),
                diffuse_last_error());
        return 1;
    }

    /* One image through the C API, progress logged. */
    p = base_params();
    memset(&log, 0, sizeof log);
    p.progress_callback = on_progress;
    p.progress_callback_user_data = &log;
    st = diffuse_generate(ctx, NULL, &p, &res);
    if (st != DIFFUSE_OK || !res) {
        fprintf(stderr, "FAIL: diffuse_generate: %s: %s\n", diffuse_status_string(st), diffuse_last_error());
        diffuse_free(ctx);
        return 1;
    }
    CHECK(strcmp(diffuse_last_error(), "") == 0, "last error after a success: '%s'", diffuse_last_error());
    CHECK(diffuse_result_count(res) == 1, "count %d, expected 1", diffuse_result_count(res));
    CHECK(diffuse_result_seed(res, 0) == 1, "seed %llu, expected 1", (unsigned long long)diffuse_result_seed(res, 0));
    rgb = diffuse_result_image(res, 0, &w, &h);
    CHECK(rgb != NULL && w == 64 && h == 64, "image %p %dx%d, expected 64x64", (const void *)rgb, w, h);
    CHECK(diffuse_result_image(res, 1, NULL, NULL) == NULL, "image 1 of 1 is not NULL");
    CHECK(diffuse_result_parameters(res, 0) && strstr(diffuse_result_parameters(res, 0), "Seed: 1"),
          "parameters lack 'Seed: 1': %s", diffuse_result_parameters(res, 0));
    {
        /* Denoise reported as (1, 2), (2, 2), in order; encode first, decode last. */
        int denoise[2][2] = {{0, 0}, {0, 0}}, nd = 0;
        for (i = 0; i < log.n && i < MAX_CALLS; ++i) {
            if (log.stage[i] != DIFFUSE_STAGE_DENOISE) continue;
            if (nd < 2) {
                denoise[nd][0] = log.done[i];
                denoise[nd][1] = log.total[i];
            }
            ++nd;
        }
        CHECK(nd == 2 && denoise[0][0] == 1 && denoise[0][1] == 2 && denoise[1][0] == 2 && denoise[1][1] == 2,
              "denoise progress: %d calls, first (%d, %d), second (%d, %d); expected (1, 2), (2, 2)", nd,
              denoise[0][0], denoise[0][1], denoise[1][0], denoise[1][1]);
        CHECK(log.n > 0 && log.stage[0] == DIFFUSE_STAGE_ENCODE, "first progress stage %d, expected encode",
              log.n > 0 ? log.stage[0] : -1);
        CHECK(log.n > 0 && log.n <= MAX_CALLS && log.stage[log.n - 1] == DIFFUSE_STAGE_DECODE,
              "last progress stage %d of %d calls, expected decode",
              log.n > 0 && log.n <= MAX_CALLS ? log.stage[log.n - 1] : -1, log.n);
    }

    /* diffuse_result_png: a PNG of the same pixels with the same parameters. */
    if (rgb && w == 64 && h == 64) {
        size_t size = 0;
        const unsigned char *bytes = diffuse_result_png(res, 0, &size);
        struct png_decoded d;
        CHECK(bytes != NULL && size > 8, "diffuse_result_png: %s", diffuse_last_error());
        if (bytes && decode_png(bytes, size, &d) == 0) {
            CHECK(d.width == 64 && d.height == 64 && d.channels == 3, "result PNG %dx%dx%d", d.width, d.height,
                  d.channels);
            CHECK(d.width == 64 && d.height == 64 && d.channels == 3 && memcmp(d.pixels, rgb, npix_bytes) == 0,
                  "result PNG pixels differ from diffuse_result_image");
            CHECK(d.parameters && strcmp(d.parameters, diffuse_result_parameters(res, 0)) == 0,
                  "result PNG parameters '%s' differ from diffuse_result_parameters", d.parameters ? d.parameters : "(none)");
            png_decoded_free(&d);
        } else if (bytes) {
            CHECK(0, "result PNG: %s", d.error);
        }
    }

    /* The CLI with the same settings; its PNG decoded here. */
    {
        char cli_png[4200];
        char *cli_argv[32];
        int k = 0, rc;
        snprintf(cli_png, sizeof cli_png, "%s/cli.png", tmp);
        snprintf(log_path, sizeof log_path, "%s/cli.log", tmp);
        cli_argv[k++] = (char *)bin;
        cli_argv[k++] = "generate";
        cli_argv[k++] = "-m";
        cli_argv[k++] = (char *)model;
        cli_argv[k++] = "-p";
        cli_argv[k++] = (char *)kPrompt;
        cli_argv[k++] = "-n";
        cli_argv[k++] = (char *)kNegative;
        cli_argv[k++] = "-W";
        cli_argv[k++] = "64";
        cli_argv[k++] = "-H";
        cli_argv[k++] = "64";
        cli_argv[k++] = "--steps";
        cli_argv[k++] = "2";
        cli_argv[k++] = "-s";
        cli_argv[k++] = "1";
        cli_argv[k++] = "--sampler";
        cli_argv[k++] = "euler";
        cli_argv[k++] = "--cfg-scale";
        cli_argv[k++] = "7";
        cli_argv[k++] = "-o";
        cli_argv[k++] = cli_png;
        cli_argv[k++] = NULL;
        rc = run_process(cli_argv, log_path);
        CHECK(rc == 0, "the CLI (%s) exited with %d; its output follows", bin, rc);
        if (rc != 0) print_file(log_path);
        if (rc == 0) {
            size_t size = 0;
            unsigned char *bytes = read_file(cli_png, &size);
            struct png_decoded d;
            CHECK(bytes != NULL, "cannot read the CLI's %s", cli_png);
            if (bytes && decode_png(bytes, size, &d) == 0) {
                CHECK(d.width == 64 && d.height == 64 && d.channels == 3, "CLI PNG %dx%dx%d, expected 64x64 RGB",
                      d.width, d.height, d.channels);
                if (rgb && d.width == 64 && d.height == 64 && d.channels == 3) {
                    int max_diff = 0;
                    const size_t diff = count_diff(rgb, d.pixels, npix_bytes, &max_diff);
                    cli_compared = 1;
                    cli_equal_bytes = npix_bytes - diff;
                    CHECK(diff == 0, "%zu of %zu pixel bytes differ from the CLI's PNG (max |diff| %d)", diff,
                          npix_bytes, max_diff);
                }
                CHECK(d.parameters != NULL, "the CLI's PNG has no parameters chunk");
                if (d.parameters)
                    CHECK(strcmp(d.parameters, diffuse_result_parameters(res, 0)) == 0,
                          "parameters differ:\n  CLI PNG: %s\n  C API:   %s", d.parameters,
                          diffuse_result_parameters(res, 0));
                png_decoded_free(&d);
            } else if (bytes) {
                CHECK(0, "the CLI's PNG %s: %s", cli_png, d.error);
            }
            free(bytes);
        }
    }

    /* A batch of 2: seeds 1 and 2. */
    {
        struct diffuse_result *batch = NULL;
        p = base_params();
        p.batch_size = 2;
        st = diffuse_generate(ctx, NULL, &p, &batch);
        CHECK(st == DIFFUSE_OK, "batch of 2: %s: %s", diffuse_status_string(st), diffuse_last_error());
        if (st == DIFFUSE_OK) {
            CHECK(diffuse_result_count(batch) == 2, "batch of 2: count %d", diffuse_result_count(batch));
            CHECK(diffuse_result_seed(batch, 0) == 1 && diffuse_result_seed(batch, 1) == 2,
                  "batch of 2: seeds %llu, %llu; expected 1, 2", (unsigned long long)diffuse_result_seed(batch, 0),
                  (unsigned long long)diffuse_result_seed(batch, 1));
            CHECK(diffuse_result_image(batch, 1, NULL, NULL) != NULL, "batch of 2: no image 1");
            diffuse_result_free(batch);
        }
    }

    /* Outpainting the first image by 16 rows at the bottom: 64x80, A1111's entries in the text. */
    {
        struct diffuse_result *op = NULL;
        int ow = 0, oh = 0;
        p = base_params();
        p.width = p.height = 0;
        p.init_image = rgb;
        p.init_width = p.init_height = 64;
        p.outpaint_bottom = 16;
        st = diffuse_generate(ctx, NULL, &p, &op);
        CHECK(st == DIFFUSE_OK, "outpaint: %s: %s", diffuse_status_string(st), diffuse_last_error());
        if (st == DIFFUSE_OK) {
            CHECK(diffuse_result_image(op, 0, &ow, &oh) != NULL && ow == 64 && oh == 80, "outpaint: %dx%d, expected 64x80",
                  ow, oh);
            CHECK(strstr(diffuse_result_parameters(op, 0), "Mask blur: 4, Masked content: fill") != NULL,
                  "outpaint: parameters '%s'", diffuse_result_parameters(op, 0));
            diffuse_result_free(op);
        }
        p.outpaint_bottom = -8;
        st = diffuse_generate(ctx, NULL, &p, &op);
        CHECK(st == DIFFUSE_ERR_INVALID_ARGUMENT && strstr(diffuse_last_error(), "--outpaint") != NULL,
              "outpaint -8: status %d, error '%s'", (int)st, diffuse_last_error());
    }

    /* Cancelling from the callback at the first denoise step. */
    {
        struct diffuse_result *cancelled = NULL;
        p = base_params();
        memset(&log, 0, sizeof log);
        log.cancel_at_denoise = 1;
        p.progress_callback = on_progress;
        p.progress_callback_user_data = &log;
        st = diffuse_generate(ctx, NULL, &p, &cancelled);
        CHECK(st == DIFFUSE_ERR_CANCELLED, "cancel: status %d (%s), expected DIFFUSE_ERR_CANCELLED", (int)st,
              diffuse_status_string(st));
        CHECK(cancelled == NULL, "cancel: a result came back");
        CHECK(*diffuse_last_error() != '\0', "cancel: diffuse_last_error() is empty");
        if (cancelled) diffuse_result_free(cancelled);
    }

    /* Width 65: an invalid argument naming the width. */
    {
        struct diffuse_result *bad = NULL;
        p = base_params();
        p.width = 65;
        st = diffuse_generate(ctx, NULL, &p, &bad);
        CHECK(st == DIFFUSE_ERR_INVALID_ARGUMENT, "width 65: status %d (%s), expected DIFFUSE_ERR_INVALID_ARGUMENT",
              (int)st, diffuse_status_string(st));
        CHECK(strstr(diffuse_last_error(), "width") != NULL, "width 65: the error does not name the width: '%s'",
              diffuse_last_error());
        CHECK(bad == NULL, "width 65: a result came back");
        if (bad) diffuse_result_free(bad);
    }

    /* One state, two runs: the same pixels, and those of the run without a state. */
    {
        struct diffuse_state *state = NULL;
        struct diffuse_result *r1 = NULL, *r2 = NULL;
        st = diffuse_state_new(ctx, &state);
        CHECK(st == DIFFUSE_OK && state, "diffuse_state_new: %s: %s", diffuse_status_string(st), diffuse_last_error());
        if (state) {
            const unsigned char *a, *b;
            int wa = 0, ha = 0, wb = 0, hb = 0, max_diff = 0;
            p = base_params();
            st = diffuse_generate(ctx, state, &p, &r1);
            CHECK(st == DIFFUSE_OK, "state run 1: %s: %s", diffuse_status_string(st), diffuse_last_error());
            st = diffuse_generate(ctx, state, &p, &r2);
            CHECK(st == DIFFUSE_OK, "state run 2: %s: %s", diffuse_status_string(st), diffuse_last_error());
            a = diffuse_result_image(r1, 0, &wa, &ha);
            b = diffuse_result_image(r2, 0, &wb, &hb);
            CHECK(a && b && wa == 64 && ha == 64 && wb == 64 && hb == 64, "state runs: missing images");
            if (a && b && wa == 64 && ha == 64 && wb == 64 && hb == 64) {
                size_t diff = count_diff(a, b, npix_bytes, &max_diff);
                CHECK(diff == 0, "state runs 1 and 2: %zu bytes differ (max |diff| %d)", diff, max_diff);
                if (rgb) {
                    diff = count_diff(a, rgb, npix_bytes, &max_diff);
                    CHECK(diff == 0, "state run vs. the run without a state: %zu bytes differ (max |diff| %d)", diff,
                          max_diff);
                }
            }
            diffuse_result_free(r1);
            diffuse_result_free(r2);
            diffuse_state_free(state);
        }
    }

    /* A1111's extras through the C API: the hires fix and a variation seed, as the PNG text says. */
    {
        struct diffuse_params hp = base_params();
        struct diffuse_result *hr = NULL;
        const char *text;
        int hw = 0, hh = 0;
        hp.hires_scale = 2.0f;
        hp.hires_steps = 1;
        hp.hires_denoise = 0.5f;
        hp.subseed = 7;
        hp.subseed_strength = 0.25f;
        st = diffuse_generate(ctx, NULL, &hp, &hr);
        CHECK(st == DIFFUSE_OK && hr, "hires + variation seed: %s: %s", diffuse_status_string(st), diffuse_last_error());
        if (hr) {
            CHECK(diffuse_result_image(hr, 0, &hw, &hh) != NULL && hw == 128 && hh == 128, "hires image %dx%d, expected 128x128",
                  hw, hh);
            text = diffuse_result_parameters(hr, 0);
            CHECK(text && strstr(text, "Variation seed: 7, Variation seed strength: 0.25") &&
                      strstr(text, "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent"),
                  "hires parameters: %s", text ? text : "(none)");
            diffuse_result_free(hr);
        }
        hp.hires_upscaler = "no-such-upscaler";
        hr = NULL;
        st = diffuse_generate(ctx, NULL, &hp, &hr);
        CHECK(st == DIFFUSE_ERR_INVALID_ARGUMENT && strstr(diffuse_last_error(), "--hires-upscaler no-such-upscaler"),
              "unknown hires upscaler: status %d, error '%s'", (int)st, diffuse_last_error());
    }

    /* Two ControlNet units (the sd1-controlnet fixture beside the model's folder) through
     * control_units, against the CLI with the same units. */
    {
        char net[4096], hint_path[4096], cli_png[4200];
        const char *at = strstr(model, "/sd1/model/");
        size_t size = 0;
        unsigned char *bytes = NULL;
        struct png_decoded hint;
        memset(&hint, 0, sizeof hint);
        if (at) {
            snprintf(net, sizeof net, "%.*s/sd1-controlnet/model/diffusers-controlnet", (int)(at - model), model);
            snprintf(hint_path, sizeof hint_path, "%.*s/sd1-controlnet/control.png", (int)(at - model), model);
            bytes = read_file(hint_path, &size);
        }
        if (bytes && decode_png(bytes, size, &hint) == 0 && hint.channels == 3) {
            struct diffuse_control_unit units[2];
            struct diffuse_params cp = base_params();
            struct diffuse_result *cr = NULL;
            char *cli_argv[48];
            int k = 0, rc;
            units[0] = diffuse_default_control_unit();
            units[0].control_net = net;
            units[0].image = hint.pixels;
            units[0].width = hint.width;
            units[0].height = hint.height;
            units[0].strength = 0.5f;
            units[0].guidance_end = 0.5f;
            units[1] = units[0];
            units[1].strength = 0.75f;
            units[1].guidance_start = 0.5f;
            units[1].guidance_end = 1.0f;
            CHECK(diffuse_default_control_unit().strength == 1.0f && diffuse_default_control_unit().guidance_end == 1.0f,
                  "diffuse_default_control_unit: strength %g, end %g", diffuse_default_control_unit().strength,
                  diffuse_default_control_unit().guidance_end);
            cp.control_units = units;
            cp.n_control_units = 2;
            st = diffuse_generate(ctx, NULL, &cp, &cr);
            CHECK(st == DIFFUSE_OK && cr, "control units: %s: %s", diffuse_status_string(st), diffuse_last_error());
            snprintf(cli_png, sizeof cli_png, "%s/cli_units.png", tmp);
            snprintf(log_path, sizeof log_path, "%s/cli_units.log", tmp);
            {
                const char *args[] = {bin, "generate", "-m", model, "-p", kPrompt, "-n", kNegative, "-W", "64", "-H",
                                      "64", "--steps", "2", "-s", "1", "--sampler", "euler", "--cfg-scale", "7",
                                      "--control-net", net, "--control-image", hint_path, "--control-net", net,
                                      "--control-image", hint_path, "--control-strength", "0.5", "0.75",
                                      "--control-start", "0", "0.5", "--control-end", "0.5", "1", "-o", cli_png};
                for (k = 0; k < (int)(sizeof args / sizeof args[0]); ++k) cli_argv[k] = (char *)args[k];
                cli_argv[k] = NULL;
            }
            rc = run_process(cli_argv, log_path);
            CHECK(rc == 0, "the CLI with two ControlNet units exited with %d", rc);
            if (rc != 0) print_file(log_path);
            if (rc == 0 && st == DIFFUSE_OK && cr) {
                size_t csize = 0;
                unsigned char *cbytes = read_file(cli_png, &csize);
                struct png_decoded d;
                int w = 0, h = 0;
                const unsigned char *rgb = diffuse_result_image(cr, 0, &w, &h);
                const char *text = diffuse_result_parameters(cr, 0);
                if (cbytes && decode_png(cbytes, csize, &d) == 0) {
                    CHECK(rgb && d.width == w && d.height == h && d.channels == 3 &&
                              memcmp(d.pixels, rgb, (size_t)w * (size_t)h * 3) == 0,
                          "control units: the C API's pixels differ from the CLI's");
                    CHECK(d.parameters && text && strcmp(d.parameters, text) == 0, "control units: parameters '%s' vs '%s'",
                          text ? text : "(none)", d.parameters ? d.parameters : "(none)");
                    printf("test_c_api: two ControlNet units through control_units vs the CLI: pixels %s\n",
                           rgb && memcmp(d.pixels, rgb, (size_t)w * (size_t)h * 3) == 0 ? "equal" : "differ");
                    png_decoded_free(&d);
                } else {
                    CHECK(0, "cannot decode the CLI's %s", cli_png);
                }
                CHECK(text && strstr(text, "ControlNet 1: \"Module: none, Model: diffusers-controlnet, Weight: 0.75, "
                                           "Guidance Start: 0.5, Guidance End: 1\""),
                      "control units: parameters '%s'", text ? text : "(none)");
                free(cbytes);
            }
            diffuse_result_free(cr);
            cp.n_control_units = 1;
            units[0].guidance_start = 0.9f;
            cr = NULL;
            st = diffuse_generate(ctx, NULL, &cp, &cr);
            CHECK(st == DIFFUSE_ERR_INVALID_ARGUMENT && strstr(diffuse_last_error(), "start 0.9"),
                  "control unit with start after end: status %d, error '%s'", (int)st, diffuse_last_error());
            diffuse_result_free(cr);
        } else {
            printf("test_c_api: ControlNet units not checked (no %s)\n", at ? hint_path : "sd1-controlnet fixture");
        }
        png_decoded_free(&hint);
        free(bytes);
    }

    diffuse_result_free(res);
    diffuse_free(ctx);

    if (cli_compared)
        printf("test_c_api: %d checks, %d failed; C API vs CLI PNG: %zu of %zu pixel bytes equal\n", n_checks,
               n_failures, cli_equal_bytes, npix_bytes);
    else
        printf("test_c_api: %d checks, %d failed; C API vs CLI PNG: not compared\n", n_checks, n_failures);
    if (n_failures == 0) nftw(tmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    else fprintf(stderr, "files kept in %s\n", tmp);
    return n_failures ? 1 : 0;
}
