/*
 * vmbench: the guest side of the VM row (scripts/bench_vm.py), compiled with gcc -static
 * into the initramfs by scripts/vm/build.py.  It runs in the guest on a block device
 * (/dev/vda) and prints one parseable line per job:
 *
 *   VMBENCH job=ID ops=N bytes=N secs=S iops=X mbps=Y lat_us=Z
 *
 * Jobs (each time-based, RUNTIME seconds, one request at a time, O_DIRECT):
 *   seqwrite      1 MiB sequential writes (wrapping at the end of the device)
 *   randwrite     4 KiB random writes
 *   randwrite-fsync  4 KiB random writes, an fdatasync after each (a virtio flush)
 *   randread      4 KiB random reads
 *
 * usage: vmbench DEVICE RUNTIME JOB[,JOB...]
 *
 * Design note: QD1 with plain pread/pwrite on an O_DIRECT descriptor, no AIO: the
 * figure is the latency of the whole disk path per request (guest virtio -> QEMU ->
 * the file -> replfs or QEMU's replication), which is what the VM row compares; the
 * random offsets come from a fixed-seed xorshift, the same on every row.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int run(int fd, uint64_t size, const char *job, double runtime, char *buf)
{
    size_t bs = strcmp(job, "seqwrite") == 0 ? (1u << 20) : 4096;
    int write_job = strcmp(job, "randread") != 0;
    int sync_each = strcmp(job, "randwrite-fsync") == 0;
    int sequential = strcmp(job, "seqwrite") == 0;
    uint64_t blocks = size / bs, seq = 0, ops = 0;
    double t0, end, t;

    if (!sequential && strcmp(job, "randwrite") != 0 && !sync_each && write_job) {
        fprintf(stderr, "vmbench: unknown job %s\n", job);
        return 1;
    }
    if (blocks == 0) {
        fprintf(stderr, "vmbench: device too small\n");
        return 1;
    }
    t0 = now();
    end = t0 + runtime;
    do {
        uint64_t blk = sequential ? seq++ % blocks : next_rand() % blocks;
        off_t off = (off_t)(blk * bs);
        ssize_t n;

        memset(buf, (int)(ops & 0xff), 8); /* a different payload per write */
        n = write_job ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
        if (n != (ssize_t)bs) {
            perror("vmbench: I/O");
            return 1;
        }
        if (sync_each && fdatasync(fd) != 0) {
            perror("vmbench: fdatasync");
            return 1;
        }
        ops++;
        t = now();
    } while (t < end);
    t -= t0;
    printf("VMBENCH job=%s ops=%llu bytes=%llu secs=%.3f iops=%.1f mbps=%.2f lat_us=%.1f\n",
           job, (unsigned long long)ops, (unsigned long long)(ops * bs), t, ops / t,
           ops * bs / t / 1e6, t * 1e6 / ops);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t size = 0;
    char *buf, *jobs, *job;
    double runtime;
    int fd, rc = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: vmbench DEVICE RUNTIME JOB[,JOB...]\n");
        return 2;
    }
    runtime = atof(argv[2]);
    fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) != 0) {
        perror(argv[1]);
        return 1;
    }
    if (posix_memalign((void **)&buf, 4096, 1u << 20) != 0)
        return 1;
    memset(buf, 0x5a, 1u << 20);
    jobs = strdup(argv[3]);
    for (job = strtok(jobs, ","); job && rc == 0; job = strtok(NULL, ","))
        rc = run(fd, size, job, runtime, buf);
    close(fd);
    return rc;
}
