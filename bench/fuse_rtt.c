// One FUSE round trip, bare: ioctl(TCGETS) on a file (the server answers ENOSYS
// without its stack; Python's isatty does exactly this on files it opens) and an
// open+close (an OPEN round trip; the release is sent without waiting), N times each.
// Prints the microseconds of each. bench/fuse_rtt.py drives it.
//
//   fuse_rtt FILE N
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static double Now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: fuse_rtt FILE N\n");
    return 2;
  }
  const int n = atoi(argv[2]);
  const int fd = open(argv[1], O_RDONLY);
  if (fd < 0 || n <= 0) {
    perror(argv[1]);
    return 2;
  }
  struct termios tio;
  const double t0 = Now();
  for (int i = 0; i < n; ++i) (void)ioctl(fd, TCGETS, &tio);
  const double t1 = Now();
  for (int i = 0; i < n; ++i) {
    const int f = open(argv[1], O_RDONLY);
    if (f < 0) {
      perror(argv[1]);
      return 1;
    }
    close(f);
  }
  const double t2 = Now();
  printf("%.2f %.2f\n", (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6);
  close(fd);
  return 0;
}
