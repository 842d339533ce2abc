// connect_bench: the cost of making TCP connections, for bench/net_bench.py.
//
//   connect_bench serve PORT          accept on 127.0.0.1:PORT and close, forever
//   connect_bench connect HOST PORT N  N times socket + connect + close; prints the
//                                      median and mean microseconds of each connect()
//                                      and of the whole socket+connect+close
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double Now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int Compare(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static void Report(const char* what, double* v, int n) {
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += v[i];
  qsort(v, (size_t)n, sizeof *v, Compare);
  printf("%s p50 %.2f us mean %.2f us p90 %.2f us\n", what, v[n / 2], sum / n, v[n * 9 / 10]);
}

int main(int argc, char** argv) {
  if (argc == 3 && strcmp(argv[1], "serve") == 0) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int on = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(argv[2]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr*)&a, sizeof a) != 0 || listen(s, 4096) != 0) {
      perror("serve");
      return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
      int c = accept(s, NULL, NULL);
      if (c >= 0) close(c);
    }
  }
  if (argc != 5 || strcmp(argv[1], "connect") != 0) {
    fprintf(stderr, "usage: connect_bench serve PORT | connect HOST PORT N\n");
    return 2;
  }
  const int n = atoi(argv[4]);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)atoi(argv[3]));
  inet_pton(AF_INET, argv[2], &a.sin_addr);
  double* conn = calloc((size_t)n, sizeof(double));
  double* whole = calloc((size_t)n, sizeof(double));
  for (int i = 0; i < n; ++i) {
    const double t0 = Now();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    const double t1 = Now();
    if (connect(s, (struct sockaddr*)&a, sizeof a) != 0) {
      perror("connect");
      return 1;
    }
    const double t2 = Now();
    close(s);
    conn[i] = t2 - t1;
    whole[i] = Now() - t0;
  }
  Report("connect", conn, n);
  Report("socket+connect+close", whole, n);
  return 0;
}
