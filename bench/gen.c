/* gen.c - fast file-system load generator for fimwatch's benchmarks.
 *
 *   gen tree ROOT NGROUPS NDIRS NFILES
 *       ROOT/gGGG/dDDDDDD/fF: NDIRS leaf dirs spread over NGROUPS group dirs,
 *       NFILES small files in each leaf.
 *   gen storm ROOT NDIRS NFILES SENTINEL
 *       create NFILES files as fast as possible round-robin over the existing
 *       ROOT/sDDD (DDD < NDIRS); after NFILES/2 files append to SENTINEL.
 *       Prints "created N files in S s (R files/s) sentinel_ns=T".
 *   gen modify DIR NFILES RATE SECONDS LOG
 *       rewrite DIR/mFFFF (FFFF < NFILES) round-robin at RATE writes/s for
 *       SECONDS, each with unique content "SEQ\n"; LOG gets
 *       "SEQ FILEINDEX CLOCK_MONOTONIC_NS" per write.
 *
 * Built by bench/bench.py with `cc -O2`. Times are CLOCK_MONOTONIC, the same
 * clock as Python's time.monotonic_ns(), so the harness can compare them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what, const char *path)
{
    fprintf(stderr, "gen: %s %s: %s\n", what, path, strerror(errno));
    exit(1);
}

static void put(const char *path, const char *buf, size_t len, int flags)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC | flags, 0644);
    if (fd < 0)
        die("open", path);
    if (len && write(fd, buf, len) != (ssize_t)len)
        die("write", path);
    close(fd);
}

static int cmd_tree(char **av)
{
    const char *root = av[0];
    long ngroups = atol(av[1]), ndirs = atol(av[2]), nfiles = atol(av[3]);
    char path[4096], buf[64];
    long d, f;
    for (long g = 0; g < ngroups; g++) {
        snprintf(path, sizeof path, "%s/g%03ld", root, g);
        if (mkdir(path, 0755) && errno != EEXIST)
            die("mkdir", path);
    }
    for (d = 0; d < ndirs; d++) {
        int n = snprintf(path, sizeof path, "%s/g%03ld/d%06ld", root, d % ngroups, d);
        if (mkdir(path, 0755) && errno != EEXIST)
            die("mkdir", path);
        for (f = 0; f < nfiles; f++) {
            snprintf(path + n, sizeof path - n, "/f%ld", f);
            int len = snprintf(buf, sizeof buf, "%ld %ld\n", d, f);
            put(path, buf, len, O_CREAT | O_TRUNC);
        }
    }
    return 0;
}

static int cmd_storm(char **av)
{
    const char *root = av[0], *sentinel = av[3];
    long ndirs = atol(av[1]), nfiles = atol(av[2]);
    char path[4096];
    long long t0 = now_ns(), ts = 0;
    for (long i = 0; i < nfiles; i++) {
        if (i == nfiles / 2) {
            ts = now_ns();
            put(sentinel, "changed in the storm\n", 21, O_APPEND);
        }
        snprintf(path, sizeof path, "%s/s%03ld/n%06ld", root, i % ndirs, i);
        put(path, "storm\n", 6, O_CREAT | O_EXCL);
    }
    double s = (now_ns() - t0) / 1e9;
    printf("created %ld files in %.3f s (%.0f files/s) sentinel_ns=%lld start_ns=%lld\n",
           nfiles, s, nfiles / s, ts, t0);
    return 0;
}

static int cmd_modify(char **av)
{
    const char *dir = av[0], *logpath = av[4];
    long nfiles = atol(av[1]);
    double rate = atof(av[2]), secs = atof(av[3]);
    long total = (long)(rate * secs);
    long long *stamp = calloc(total ? total : 1, sizeof *stamp);
    char path[4096], buf[64];
    long long t0 = now_ns();
    long i;
    if (!stamp)
        die("calloc", "");
    for (i = 0; i < total; i++) {
        /* pace in 1 ms ticks: write the writes due by now, then sleep */
        long long due = t0 + (long long)(i * 1e9 / rate);
        long long t = now_ns();
        if (due > t) {
            struct timespec ts = {due / 1000000000LL, due % 1000000000LL};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
        long f = i % nfiles;
        snprintf(path, sizeof path, "%s/m%04ld", dir, f);
        int len = snprintf(buf, sizeof buf, "%ld\n", i);
        put(path, buf, len, O_TRUNC);
        stamp[i] = now_ns();
    }
    double s = (now_ns() - t0) / 1e9;
    FILE *log = fopen(logpath, "w");
    if (!log)
        die("fopen", logpath);
    for (i = 0; i < total; i++)
        fprintf(log, "%ld %ld %lld\n", i, i % nfiles, stamp[i]);
    fclose(log);
    printf("wrote %ld times in %.3f s (%.0f writes/s)\n", total, s, total / s);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 6 && !strcmp(argv[1], "tree"))
        return cmd_tree(argv + 2);
    if (argc == 6 && !strcmp(argv[1], "storm"))
        return cmd_storm(argv + 2);
    if (argc == 7 && !strcmp(argv[1], "modify"))
        return cmd_modify(argv + 2);
    fprintf(stderr, "usage: gen tree ROOT NGROUPS NDIRS NFILES\n"
                    "       gen storm ROOT NDIRS NFILES SENTINEL\n"
                    "       gen modify DIR NFILES RATE SECONDS LOG\n");
    return 2;
}
