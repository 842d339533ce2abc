// One FUSE round trip, bare: ioctl(TCGETS) on a file (the server answers ENOSYS
// without its stack; Python's isatty does exactly this on files it opens) and an
// open+close (an OPEN round trip; the release is sent without waiting), N times each.
// Prints the mean microseconds of each. With GAP, the program computes (spins) GAP µs
// before each call, as a program that does some work between its requests: the
// server's CPUs may then go idle between requests. Only the calls are timed.
// bench/fuse_rtt.py drives it.
//
//   fuse_rtt FILE N [GAP]
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

static void Spin(double seconds) {
  if (seconds <= 0) return;
  const double until = Now() + seconds;
  while (Now() < until) {
  }
}

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    fprintf(stderr, "usage: fuse_rtt FILE N [GAP]\n");
    return 2;
  }
  const int n = atoi(argv[2]);
  const double gap = argc == 4 ? atof(argv[3]) / 1e6 : 0;
  const int fd = open(argv[1], O_RDONLY);
  if (fd < 0 || n <= 0) {
    perror(argv[1]);
    return 2;
  }
  struct termios tio;
  double ioctls = 0, opens = 0;
  for (int i = 0; i < n; ++i) {
    Spin(gap);
    const double t0 = Now();
    (void)ioctl(fd, TCGETS, &tio);
    ioctls += Now() - t0;
  }
  for (int i = 0; i < n; ++i) {
    Spin(gap);
    const double t0 = Now();
    const int f = open(argv[1], O_RDONLY);
    if (f < 0) {
      perror(argv[1]);
      return 1;
    }
    close(f);
    opens += Now() - t0;
  }
  printf("%.2f %.2f\n", ioctls / n * 1e6, opens / n * 1e6);
  close(fd);
  return 0;
}
