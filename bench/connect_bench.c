// connect_bench: the cost of making TCP connections, for bench/net_bench.py.
//
//   connect_bench serve PORT          accept on 127.0.0.1:PORT and close, forever
//   connect_bench connect HOST PORT N  N times socket + connect + close; prints the
//                                      median and mean microseconds of each connect()
//                                      and of the whole socket+connect+close
//   connect_bench floor HOST PORT N    the same, with every connect sent to a minimal
//                                      seccomp supervisor (one thread, blocking
//                                      receive) that answers CONTINUE: the least any
//                                      design built on seccomp notifications adds
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <seccomp.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
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

static int g_listener = -1;

// The minimal supervisor: receive, answer CONTINUE, forever.
static void* Supervise(void* unused) {
  (void)unused;
  struct seccomp_notif* req;
  struct seccomp_notif_resp* resp;
  if (seccomp_notify_alloc(&req, &resp) != 0) return NULL;
  for (;;) {
    memset(req, 0, sizeof *req);
    if (ioctl(g_listener, SECCOMP_IOCTL_NOTIF_RECV, req) != 0) continue;
    memset(resp, 0, sizeof *resp);
    resp->id = req->id;
    resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
    ioctl(g_listener, SECCOMP_IOCTL_NOTIF_SEND, resp);
  }
  return NULL;
}

static int Connects(const char* host, int port, int n);

int main(int argc, char** argv) {
  if (argc == 5 && strcmp(argv[1], "floor") == 0) {
    // The filter is loaded in a child (it applies to the loader); the listener comes
    // back to this process over a socketpair before the child starts connecting.
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    pid_t child = fork();
    if (child == 0) {
      scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
      seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(connect), 0);
      if (seccomp_load(ctx) != 0) _exit(1);
      int fd = seccomp_notify_fd(ctx);
      char c = 0;
      struct iovec iov = {&c, 1};
      char control[CMSG_SPACE(sizeof(int))];
      memset(control, 0, sizeof control);
      struct msghdr h = {0};
      h.msg_iov = &iov;
      h.msg_iovlen = 1;
      h.msg_control = control;
      h.msg_controllen = sizeof control;
      struct cmsghdr* cm = CMSG_FIRSTHDR(&h);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sizeof(int));
      memcpy(CMSG_DATA(cm), &fd, sizeof fd);
      sendmsg(sv[1], &h, 0);
      if (read(sv[1], &c, 1) != 1) _exit(1);  // the supervisor is ready
      _exit(Connects(argv[2], atoi(argv[3]), atoi(argv[4])));
    }
    char c;
    struct iovec iov = {&c, 1};
    char control[CMSG_SPACE(sizeof(int))];
    struct msghdr h = {0};
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = control;
    h.msg_controllen = sizeof control;
    if (recvmsg(sv[0], &h, 0) != 1) return 1;
    memcpy(&g_listener, CMSG_DATA(CMSG_FIRSTHDR(&h)), sizeof g_listener);
    ioctl(g_listener, SECCOMP_IOW(4, __u64), 1UL);  // NOTIF_SET_FLAGS(SYNC_WAKE_UP), as ulsp does
    pthread_t t;
    pthread_create(&t, NULL, Supervise, NULL);
    if (write(sv[0], "x", 1) != 1) return 1;
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  }
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
    fprintf(stderr, "usage: connect_bench serve PORT | connect HOST PORT N | floor HOST PORT N\n");
    return 2;
  }
  return Connects(argv[2], atoi(argv[3]), atoi(argv[4]));
}

static int Connects(const char* host, int port, int n) {
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  inet_pton(AF_INET, host, &a.sin_addr);
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
  fflush(stdout);
  return 0;
}
