// LD_PRELOAD measurement aid for bench/link-order.sh, never shipped. In a process whose
// executable ends in "/ztunnel", it splits the binary's read-only and code mappings into one-page
// mappings (alternate pages get MADV_DONTDUMP, which changes only the mapping's flags) so that the
// kernel's 64 KiB fault-around cannot map neighbours, then drops their page-table entries
// (MADV_DONTNEED: these pages are never written). Every page resident afterwards was executed
// or read after start-up.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

__attribute__((constructor)) static void split_init(void) {
    char exe[4096];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return;
    exe[n] = 0;
    size_t len = strlen(exe);
    if (len < 8 || strcmp(exe + len - 8, "/ztunnel") != 0) return;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) return;
    unsigned long ranges[8][2];
    int count = 0;
    char line[8192];
    while (fgets(line, sizeof line, maps) && count < 8) {
        unsigned long start, end, offset;
        char perms[5], path[4096] = "";
        if (sscanf(line, "%lx-%lx %4s %lx %*s %*s %4095s", &start, &end, perms, &offset, path) < 4) continue;
        if (strcmp(path, exe) != 0) continue;
        if ((strcmp(perms, "r--p") == 0 && offset == 0) || strcmp(perms, "r-xp") == 0) {
            ranges[count][0] = start;
            ranges[count][1] = end;
            count++;
        }
    }
    fclose(maps);
    for (int i = 0; i < count; i++)
        for (unsigned long p = ranges[i][0]; p < ranges[i][1]; p += 8192) madvise((void *)p, 4096, MADV_DONTDUMP);
    for (int i = 0; i < count; i++) madvise((void *)ranges[i][0], ranges[i][1] - ranges[i][0], MADV_DONTNEED);
}
