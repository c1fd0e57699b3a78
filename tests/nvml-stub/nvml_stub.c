/*
 * A stand-in libnvidia-ml.so.1 for testing gpufleet's NVML path on machines
 * without a GPU. The worker loads it through nvml-wrapper exactly as it
 * loads NVIDIA's (dlopen of "libnvidia-ml.so.1", found on LD_LIBRARY_PATH).
 *
 * It implements only the calls the worker makes (see worker/src/gpu.rs and
 * nvml-wrapper 0.13: Nvml::init, sys_driver_version, device_count,
 * device_by_index, Device::{uuid, name, index, memory_info,
 * running_compute_processes, utilization_rates, temperature}, and the
 * shutdown in Nvml's Drop), with the signatures and struct layouts of
 * NVIDIA's nvml.h. Every call re-reads a table, the file named by
 * $NVML_STUB_TABLE, so a test changes the "hardware" while the worker runs.
 * The test kit writes it (tests/src/nvml.rs); one record per line, '#'
 * starts a comment:
 *
 *   driver VERSION                  what nvmlSystemGetDriverVersion says
 *   init CODE                       what nvmlInit_v2 returns (0: success)
 *   gpu INDEX UUID TOTAL UTIL TEMP NAME...
 *                                   a GPU: memory in bytes, utilisation in
 *                                   percent, temperature in C, the rest of
 *                                   the line its name
 *   used INDEX BYTES                memory used on that GPU by no listed
 *                                   process (driver, other containers)
 *   proc INDEX PID BYTES [hidden]   a compute process and its memory;
 *                                   `hidden`: the list gives its memory as
 *                                   not available (it still counts as used)
 *   noprocs INDEX                   the process list of that GPU is not
 *                                   available (NVML_ERROR_NOT_SUPPORTED)
 *   lost INDEX                      the GPU fell off the bus: it is still
 *                                   counted and has a handle, but every
 *                                   query of it fails (GPU_IS_LOST)
 *
 * A GPU's used memory is its `used` plus its processes'; free is the rest.
 * A table that cannot be read or parsed makes calls fail with
 * NVML_ERROR_UNKNOWN and a line on stderr saying why.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct stub_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

/* nvml.h's nvmlMemory_v2_t, nvmlUtilization_t and nvmlProcessInfo_v2_t
 * (what the _v3 process calls fill). */
typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

#define NVML_MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))
#define NVML_VALUE_NOT_AVAILABLE 0xFFFFFFFFu
#define NVML_VALUE_NOT_AVAILABLE_ULL 0xFFFFFFFFFFFFFFFFull

#define MAX_GPUS 16
#define MAX_PROCS 256

struct gpu {
    unsigned index;
    char uuid[96];
    char name[96];
    unsigned long long total, used_other;
    unsigned util, temp;
    int no_procs, lost;
};

struct proc {
    unsigned gpu;
    unsigned pid;
    unsigned long long bytes;
    int hidden;
};

struct table {
    char driver[80];
    int init_code;
    struct gpu gpus[MAX_GPUS];
    unsigned n_gpus;
    struct proc procs[MAX_PROCS];
    unsigned n_procs;
};

/* Handles point into this array; the slot number is the GPU's position in
 * the table, which a test keeps stable while it runs. */
struct stub_device {
    unsigned slot;
};
static struct stub_device devices[MAX_GPUS];
static int initialized;

static void complain(const char *what, const char *detail) {
    fprintf(stderr, "nvml stub: %s: %s\n", what, detail);
}

static struct gpu *gpu_by_index(struct table *t, unsigned index) {
    for (unsigned i = 0; i < t->n_gpus; i++)
        if (t->gpus[i].index == index)
            return &t->gpus[i];
    return NULL;
}

/* Reads $NVML_STUB_TABLE into *t; a non-zero NVML code when it cannot. */
static nvmlReturn_t load(struct table *t) {
    const char *path = getenv("NVML_STUB_TABLE");
    memset(t, 0, sizeof *t);
    if (path == NULL || *path == '\0') {
        complain("NVML_STUB_TABLE", "not set");
        return NVML_ERROR_UNKNOWN;
    }
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        complain(path, strerror(errno));
        return NVML_ERROR_UNKNOWN;
    }
    char line[512];
    nvmlReturn_t rc = NVML_SUCCESS;
    while (rc == NVML_SUCCESS && fgets(line, sizeof line, f) != NULL) {
        char *hash = strchr(line, '#');
        if (hash != NULL)
            *hash = '\0';
        line[strcspn(line, "\r\n")] = '\0';
        char word[16];
        int used = 0;
        if (sscanf(line, " %15s%n", word, &used) != 1)
            continue; /* blank */
        const char *rest = line + used;
        int ok = 0;
        if (strcmp(word, "driver") == 0) {
            ok = sscanf(rest, " %79s", t->driver) == 1;
        } else if (strcmp(word, "init") == 0) {
            ok = sscanf(rest, " %d", &t->init_code) == 1;
        } else if (strcmp(word, "gpu") == 0 && t->n_gpus < MAX_GPUS) {
            struct gpu *g = &t->gpus[t->n_gpus];
            int name_at = 0;
            ok = sscanf(rest, " %u %95s %llu %u %u %n", &g->index, g->uuid, &g->total, &g->util,
                        &g->temp, &name_at) == 5 &&
                 name_at > 0 && rest[name_at] != '\0';
            if (ok) {
                snprintf(g->name, sizeof g->name, "%s", rest + name_at);
                t->n_gpus++;
            }
        } else if (strcmp(word, "used") == 0) {
            unsigned index;
            unsigned long long bytes;
            struct gpu *g;
            ok = sscanf(rest, " %u %llu", &index, &bytes) == 2 &&
                 (g = gpu_by_index(t, index)) != NULL;
            if (ok)
                g->used_other = bytes;
        } else if (strcmp(word, "proc") == 0 && t->n_procs < MAX_PROCS) {
            struct proc *p = &t->procs[t->n_procs];
            char flag[16] = "";
            int fields = sscanf(rest, " %u %u %llu %15s", &p->gpu, &p->pid, &p->bytes, flag);
            ok = (fields == 3 || (fields == 4 && strcmp(flag, "hidden") == 0)) &&
                 gpu_by_index(t, p->gpu) != NULL;
            p->hidden = fields == 4;
            if (ok)
                t->n_procs++;
        } else if (strcmp(word, "noprocs") == 0) {
            unsigned index;
            struct gpu *g;
            ok = sscanf(rest, " %u", &index) == 1 && (g = gpu_by_index(t, index)) != NULL;
            if (ok)
                g->no_procs = 1;
        } else if (strcmp(word, "lost") == 0) {
            unsigned index;
            struct gpu *g;
            ok = sscanf(rest, " %u", &index) == 1 && (g = gpu_by_index(t, index)) != NULL;
            if (ok)
                g->lost = 1;
        }
        if (!ok) {
            complain("cannot read this table line", line);
            rc = NVML_ERROR_UNKNOWN;
        }
    }
    fclose(f);
    return rc;
}

/* The table and the GPU a handle stands for, or why not. */
static nvmlReturn_t device(nvmlDevice_t d, struct table *t, struct gpu **g) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (d == NULL || d < devices || d >= devices + MAX_GPUS)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = load(t);
    if (rc != NVML_SUCCESS)
        return rc;
    if (d->slot >= t->n_gpus || t->gpus[d->slot].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *g = &t->gpus[d->slot];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *out, unsigned length, const char *s) {
    if (out == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    struct table t;
    nvmlReturn_t rc = load(&t);
    if (rc != NVML_SUCCESS)
        return rc;
    if (t.init_code != NVML_SUCCESS)
        return t.init_code;
    for (unsigned i = 0; i < MAX_GPUS; i++)
        devices[i].slot = i;
    initialized++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    initialized--;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    struct table t;
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t rc = load(&t);
    return rc != NVML_SUCCESS ? rc : copy_string(version, length, t.driver);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct table t;
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = load(&t);
    if (rc == NVML_SUCCESS)
        *count = t.n_gpus;
    return rc;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *out) {
    struct table t;
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (out == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = load(&t);
    if (rc != NVML_SUCCESS)
        return rc;
    for (unsigned i = 0; i < t.n_gpus; i++) {
        if (t.gpus[i].index == index) {
            *out = &devices[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_INVALID_ARGUMENT;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    return rc != NVML_SUCCESS ? rc : copy_string(uuid, length, g->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    return rc != NVML_SUCCESS ? rc : copy_string(name, length, g->name);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    if (rc == NVML_SUCCESS && index == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *index = g->index;
    return rc;
}

static unsigned long long used_on(const struct table *t, const struct gpu *g) {
    unsigned long long used = g->used_other;
    for (unsigned i = 0; i < t->n_procs; i++)
        if (t->procs[i].gpu == g->index)
            used += t->procs[i].bytes;
    return used;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *memory) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* As the driver does: a caller built against another layout is told. */
    if (memory->version != NVML_MEMORY_V2_VERSION)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    unsigned long long used = used_on(&t, g);
    if (used > g->total)
        used = g->total;
    memory->total = g->total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = g->total - used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g->no_procs)
        return NVML_ERROR_NOT_SUPPORTED;
    unsigned n = 0;
    for (unsigned i = 0; i < t.n_procs; i++)
        if (t.procs[i].gpu == g->index)
            n++;
    /* The driver's contract: too small a buffer (or none) gets the count
     * needed and INSUFFICIENT_SIZE; nvml-wrapper asks for the count first. */
    if (n > *count || (infos == NULL && n > 0)) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (unsigned i = 0; i < t.n_procs; i++) {
        if (t.procs[i].gpu != g->index)
            continue;
        infos[k].pid = t.procs[i].pid;
        infos[k].usedGpuMemory =
            t.procs[i].hidden ? NVML_VALUE_NOT_AVAILABLE_ULL : t.procs[i].bytes;
        infos[k].gpuInstanceId = NVML_VALUE_NOT_AVAILABLE;
        infos[k].computeInstanceId = NVML_VALUE_NOT_AVAILABLE;
        k++;
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *utilization) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    if (rc == NVML_SUCCESS && utilization == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        utilization->gpu = g->util;
        utilization->memory = g->total ? (unsigned)(100 * used_on(&t, g) / g->total) : 0;
    }
    return rc;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *temp) {
    struct table t;
    struct gpu *g;
    nvmlReturn_t rc = device(d, &t, &g);
    if (rc == NVML_SUCCESS && (temp == NULL || sensor != 0 /* NVML_TEMPERATURE_GPU */))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *temp = g->temp;
    return rc;
}
