/*
 * diffuse.h: the C API of diffuse, a native Stable Diffusion engine (SD 1.x, SD 2.x, SDXL).
 *
 * One context holds one loaded checkpoint (single .safetensors/.ckpt file or diffusers folder);
 * each generation takes a parameter struct (start from diffuse_default_params()) and returns a
 * result holding 8-bit RGB images, their seeds and A1111 "parameters" texts.
 *
 *     struct diffuse_context_params cp = diffuse_context_default_params();
 *     struct diffuse_context *ctx = NULL;
 *     if (diffuse_init_from_file("model.safetensors", cp, &ctx) != DIFFUSE_OK) {
 *         fprintf(stderr, "%s\n", diffuse_last_error());
 *         return 1;
 *     }
 *     struct diffuse_params p = diffuse_default_params();
 *     p.prompt = "a lighthouse at dusk";
 *     p.seed = 42;
 *     struct diffuse_result *res = NULL;
 *     if (diffuse_generate(ctx, NULL, &p, &res) == DIFFUSE_OK) {
 *         int w, h;
 *         const unsigned char *rgb = diffuse_result_image(res, 0, &w, &h);
 *         ...
 *         diffuse_result_free(res);
 *     }
 *     diffuse_free(ctx);
 *
 * Errors: every function that can fail returns a diffuse_status; diffuse_last_error() gives the
 * message of the last failure on the calling thread (naming the file, field or setting), valid
 * until the thread's next call into the library.
 *
 * Threads and memory: a context (the loaded weights) may be used by several threads at once.
 * Each run's scratch memory lives in a diffuse_state; give each thread its own state (or NULL:
 * a temporary state for that call) and runs execute side by side. A run whose LoRA set differs
 * from the one applied waits for the runs using that set to finish, then switches: only the
 * affected weights are replaced, and a failed switch leaves the model as it was. A state must not
 * be used by two runs at the same time. diffuse_free() must not overlap any other call on the
 * context.
 *
 * Sharing cores with other busy processes: the library computes with OpenMP (libgomp), whose idle
 * workers spin before they sleep; start the program with GOMP_SPINCOUNT=1000 in its environment
 * (the diffuse CLI sets it for itself) or two busy processes on the same cores run several times
 * slower than their fair share. libgomp reads it once, when it is loaded.
 *
 * Strings are UTF-8 and copied by the call that receives them; NULL string fields mean "not set".
 */
#ifndef DIFFUSE_H
#define DIFFUSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define DIFFUSE_API __attribute__((visibility("default")))
#else
#define DIFFUSE_API
#endif

#define DIFFUSE_API_VERSION 1

typedef enum diffuse_status {
    DIFFUSE_OK = 0,
    DIFFUSE_ERR_INVALID_ARGUMENT = 1, /* a parameter is out of range or inconsistent */
    DIFFUSE_ERR_FILE = 2,             /* a model, LoRA, ControlNet or image could not be read */
    DIFFUSE_ERR_CANCELLED = 3,        /* the progress callback asked to stop */
    DIFFUSE_ERR_OUT_OF_MEMORY = 4,
    DIFFUSE_ERR_INTERNAL = 5
} diffuse_status;

/* Opaque handles. */
struct diffuse_context; /* a loaded model (and its applied LoRA set) */
struct diffuse_state;   /* one run's scratch memory, reusable for consecutive runs */
struct diffuse_result;  /* the images of one run */

enum diffuse_stage {
    DIFFUSE_STAGE_ENCODE = 0,  /* prompt encoding: (0, 1) then (1, 1) */
    DIFFUSE_STAGE_DENOISE = 1, /* once per sampling step: (step, steps) */
    DIFFUSE_STAGE_DECODE = 2   /* VAE decode, per image: (image, images) */
};

/* Called during a run; return 0 to go on, nonzero to cancel (the run returns
 * DIFFUSE_ERR_CANCELLED). Runs on the thread that called diffuse_generate(). */
typedef int (*diffuse_progress_callback)(enum diffuse_stage stage, int done, int total, void *user_data);

struct diffuse_context_params {
    int n_threads;            /* 0: all physical cores (the setting is process-wide) */
    const char *precision;    /* "auto" (bf16 where the CPU has fast bf16), "fp32", "bf16" */
    const char *weights;      /* "native" or "int8" */
    const char *lora_dir;     /* where <lora:NAME:W> prompt tags find NAME.safetensors; NULL: none */
    const char *cache_dir;    /* model-hash cache folder; NULL: $DIFFUSE_CACHE_DIR, $XDG_CACHE_HOME/diffuse
                                 or ~/.cache/diffuse */
};

struct diffuse_lora {
    const char *path;         /* .safetensors (kohya/A1111, PEFT, LoCon) or .pt/.ckpt */
    float multiplier;
};

/* One ControlNet unit (diffuse_params.control_units); start from diffuse_default_control_unit(). */
struct diffuse_control_unit {
    const char *control_net;      /* ControlNet file or diffusers folder */
    const unsigned char *image;   /* 8-bit RGB hint, width*height*3 bytes (resized to the output size) */
    int width, height;
    float strength;               /* conditioning scale, default 1 */
    float guidance_start;         /* A1111's Guidance Start/End: the unit runs at step i of n while */
    float guidance_end;           /* start <= i/n <= end; defaults 0 and 1 (every step) */
    int guess_mode;               /* nonzero: diffusers' guess mode (conditional pass only, scales 0.1 to 1) */
    int canny;                    /* nonzero: turn the hint into Canny edges first */
};

struct diffuse_params {
    const char *prompt;           /* A1111 syntax: (word:1.3), [word], BREAK, <lora:NAME:W> */
    const char *negative_prompt;
    int width, height;            /* multiples of 8; 0: the init image's size, else the model's native size
                                     (its modelspec.resolution metadata, else the family's) */
    int steps;                    /* default 20 */
    float cfg_scale;              /* default 7 */
    int64_t seed;                 /* < 0: random (diffuse_result_seed tells) */
    const char *sampler;          /* default "euler_a"; also ddim, pndm, euler, heun, lms, dpm2, dpm2_a,
                                     dpm++2m, dpm++2m_sde, dpm++2s, unipc, deis, lcm, ddpm */
    const char *scheduler;        /* "default", "karras", "trailing" */
    int batch_size;               /* default 1 */
    int clip_skip;                /* A1111 meaning; 0: the model's default */
    const char *rng;              /* "cuda" (A1111's default, the same image on every machine) or "cpu" */
    const char *prediction;       /* NULL: from the model; "eps" or "v" */

    /* img2img / inpainting: 8-bit RGB, row-major, width*height*3 bytes; NULL: txt2img */
    const unsigned char *init_image;
    int init_width, init_height;
    const unsigned char *mask_image; /* 8-bit grey (1 byte a pixel), white = repaint; init's size */
    float strength;               /* < 0: 0.75 (1 for inpainting models) */

    const struct diffuse_lora *loras; /* besides the prompt's tags */
    int n_loras;

    const char *control_net;      /* ControlNet file or diffusers folder; NULL: none */
    const unsigned char *control_image; /* 8-bit RGB hint */
    int control_width, control_height;
    float control_strength;       /* default 1 */
    int canny;                    /* nonzero: turn the hint into Canny edges first */

    int vae_tiling;               /* -1 automatic (above 1024x1024), 0 off, 1 on */

    diffuse_progress_callback progress_callback;
    void *progress_callback_user_data;

    /* A1111's extras (appended after the fields above; diffuse_default_params() sets them). */
    const char *vae;              /* standalone VAE file; NULL: the checkpoint's (or MODEL.vae.safetensors beside it) */
    const char *embeddings_dir;   /* textual inversions used by name in prompts; NULL: "embeddings" beside the model */
    int64_t subseed;              /* variation seed (image i: subseed + i); < 0: random */
    float subseed_strength;       /* 0 (off) to 1 */
    float hires_scale;            /* > 0 (or hires_width/height > 0): the hires fix (txt2img); 0: off */
    int hires_width, hires_height;  /* the hires size instead of a scale (one of them: the other keeps the ratio) */
    int hires_steps;              /* 0: the same as steps */
    float hires_denoise;          /* default 0.7 */
    const char *hires_upscaler;   /* "latent" (default), "latent-bicubic", "latent-nearest", ..., "lanczos", "nearest", "esrgan" */
    const char *hires_upscaler_model; /* ESRGAN / Real-ESRGAN file for "esrgan" */
    /* More ControlNet units, after control_net when that is set; their residuals are summed. */
    const struct diffuse_control_unit *control_units;
    int n_control_units;
    /* A1111's inpainting controls and outpainting (the CLI's --mask-blur ... --outpaint). */
    int mask_blur;                /* Gaussian sigma in pixels, 0-64; -1 (default): 0, or 4 when outpainting */
    int invert_mask;              /* nonzero: repaint what the mask leaves black */
    const char *masked_content;   /* "original" (NULL; "fill" when outpainting), "fill", "latent noise", "latent nothing" */
    int inpaint_only_masked;      /* nonzero: inpaint the mask's box at width x height, pasted back at the init's size */
    int only_masked_padding;      /* default 32 */
    int outpaint_left, outpaint_right, outpaint_top, outpaint_bottom; /* pixels added to init_image (width, height 0) */
    const char *unet;             /* UNet-only file instead of the checkpoint's UNet; NULL: the checkpoint's */
};

DIFFUSE_API const char *diffuse_version(void);
DIFFUSE_API const char *diffuse_status_string(diffuse_status s);
/* The message of the last failure on this thread ("" if none). */
DIFFUSE_API const char *diffuse_last_error(void);

DIFFUSE_API struct diffuse_context_params diffuse_context_default_params(void);
/* Loads the checkpoint at `path` (validated strictly; a bad file is an error naming it). */
DIFFUSE_API diffuse_status diffuse_init_from_file(const char *path, struct diffuse_context_params params,
                                                  struct diffuse_context **out);
DIFFUSE_API void diffuse_free(struct diffuse_context *ctx);

DIFFUSE_API diffuse_status diffuse_state_new(struct diffuse_context *ctx, struct diffuse_state **out);
DIFFUSE_API void diffuse_state_free(struct diffuse_state *state);

DIFFUSE_API struct diffuse_params diffuse_default_params(void);
DIFFUSE_API struct diffuse_control_unit diffuse_default_control_unit(void);
/* Runs one generation with the context's model. state may be NULL. On success *out holds the
 * result (free it with diffuse_result_free). */
DIFFUSE_API diffuse_status diffuse_generate(struct diffuse_context *ctx, struct diffuse_state *state,
                                            const struct diffuse_params *params, struct diffuse_result **out);

DIFFUSE_API int diffuse_result_count(const struct diffuse_result *res);
/* Image i as 8-bit RGB rows (width*height*3 bytes, owned by the result). NULL if i is out of range. */
DIFFUSE_API const unsigned char *diffuse_result_image(const struct diffuse_result *res, int i, int *width,
                                                      int *height);
DIFFUSE_API uint64_t diffuse_result_seed(const struct diffuse_result *res, int i);
/* A1111's "parameters" text of image i (what the CLI writes into its PNGs). */
DIFFUSE_API const char *diffuse_result_parameters(const struct diffuse_result *res, int i);
/* Image i as a PNG file in memory (with the "parameters" text chunk); *size gets its length. */
DIFFUSE_API const unsigned char *diffuse_result_png(struct diffuse_result *res, int i, size_t *size);
DIFFUSE_API void diffuse_result_free(struct diffuse_result *res);

#ifdef __cplusplus
}
#endif

#endif /* DIFFUSE_H */
