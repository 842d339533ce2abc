// probe: small attempts to reach the network from inside a group, each the way a
// program trying to get around the net ULSP would make it. Each prints what happened
// ("ok", an errno name, what the peer said); the tests decide what should have.
//
//   probe tcp-raw HOST PORT            socket + syscall(SYS_connect), then read a line
//   probe tcp-timeout HOST PORT MS     a blocking connect with SO_SNDTIMEO MS: its answer,
//                                      when it came, and the socket's options after
//   probe udp-sendto|udp-sendmsg|udp-sendmmsg HOST PORT   a datagram, then the echo
//   probe udp-connect HOST PORT        connect + send, then the echo
//   probe fastopen HOST PORT           sendto(MSG_FASTOPEN) with an address
//   probe int80                        socket and socketcall through the 32-bit ABI
//                                      ("no-abi" where the kernel has none)
//   probe iouring                      io_uring_setup
//   probe tiocsti                      types "#" into the terminal on stdin (TIOCSTI):
//                                      natively, with high bits in the request, and
//                                      through the 32-bit ABI
//   probe race HOST ALLOWED DENIED N   a thread rewrites the sockaddr during connects
//   probe unix PATH | unix-dgram PATH  a UNIX socket path
//   probe inherited HOST PORT          fd 3 (inherited?), and sendto on stdin (a socket?)
//   probe passfd HOST ALLOWED DENIED   a UDP socket allowed once, passed to a child
//   probe malformed HOST PORT          bad lengths, pointers and families, then a good one
//   probe serve-once PORT              (in the group) listen on 127.0.0.1:PORT, answer one
//   probe pid-reuse HOST PORT TIDFILE  a thread connects and ends (its tid to TIDFILE);
//                                      threads are made until one has its tid, which connects
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char* Name(int err) {
  switch (err) {
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    case EAFNOSUPPORT: return "EAFNOSUPPORT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EBADF: return "EBADF";
    case ENOTSOCK: return "ENOTSOCK";
    case ENOENT: return "ENOENT";
    case EINPROGRESS: return "EINPROGRESS";
    case EMSGSIZE: return "EMSGSIZE";
    case EDESTADDRREQ: return "EDESTADDRREQ";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return strerror(err);
  }
}

static struct sockaddr_in Addr(const char* host, int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  inet_pton(AF_INET, host, &a.sin_addr);
  return a;
}

// Reads what the peer says within a second.
static void ReadReply(int fd) {
  struct pollfd p = {fd, POLLIN, 0};
  char buf[256];
  if (poll(&p, 1, 1000) <= 0) {
    printf("no reply\n");
    return;
  }
  ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) {
    printf("no reply\n");
    return;
  }
  buf[n] = 0;
  buf[strcspn(buf, "\n")] = 0;
  printf("got: %s\n", buf);
}

static int TcpRaw(const char* host, int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = Addr(host, port);
  if (syscall(SYS_connect, s, &a, sizeof a) != 0) {
    printf("connect: %s\n", Name(errno));
    return 0;
  }
  printf("connect: ok\n");
  ReadReply(s);
  return 0;
}

static int TcpTimeout(const char* host, int port, int ms) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
  setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  struct sockaddr_in a = Addr(host, port);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const int r = connect(s, (struct sockaddr*)&a, sizeof a);
  const int err = errno;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const long took = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
  struct timeval back = {0, 0};
  socklen_t len = sizeof back;
  getsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &back, &len);
  const int fl = fcntl(s, F_GETFL);
  const char* when = took < ms / 2 ? "at once" : took >= ms * 9 / 10 && took < ms + 1000 ? "at the timeout" : "late";
  printf("connect: %s %s; SO_SNDTIMEO %ld ms; %s\n", r == 0 ? "ok" : Name(err), when,
         (long)(back.tv_sec * 1000 + back.tv_usec / 1000), (fl & O_NONBLOCK) ? "non-blocking" : "blocking");
  return 0;
}

// pid-reuse: the thread to connect is the one whose tid is g_reuse_tid (0: any).
static const char* g_reuse_host;
static int g_reuse_port;
static pid_t g_reuse_tid;
static int g_reuse_quiet;  // a first thread after the first says nothing

static void* ConnectIfTid(void* unused) {
  (void)unused;
  const pid_t tid = (pid_t)syscall(SYS_gettid);
  if (g_reuse_tid != 0 && tid != g_reuse_tid) return NULL;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = Addr(g_reuse_host, g_reuse_port);
  const int r = connect(s, (struct sockaddr*)&a, sizeof a);
  if (g_reuse_tid != 0 || !g_reuse_quiet || r != 0)
    printf("%s: %s\n", g_reuse_tid != 0 ? "same tid" : "first", r == 0 ? "ok" : Name(errno));
  close(s);
  return (void*)(intptr_t)tid;
}

// The thread that connects first and ends: its tid, written to TIDFILE.
static int FirstThread(const char* tidfile) {
  pthread_t t;
  void* first = NULL;
  g_reuse_tid = 0;
  pthread_create(&t, NULL, ConnectIfTid, NULL);
  pthread_join(t, &first);
  g_reuse_tid = (pid_t)(intptr_t)first;
  fflush(stdout);
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", tidfile);
  FILE* f = fopen(tmp, "w");
  if (f == NULL || fprintf(f, "%d\n", (int)g_reuse_tid) < 0 || fclose(f) != 0 || rename(tmp, tidfile) != 0) {
    printf("cannot write %s\n", tidfile);
    return 1;
  }
  return 0;
}

// A thread connects and ends, and its tid is written to TIDFILE; threads are then
// made until one has that tid (the kernel hands tids out in a cycle of pid_max, and
// the test may send its allocator back to just below it), and that one connects too.
// Another process on the host may take the tid first and keep it: after 10 s without
// it, a new first thread (which prints nothing) gives a new tid to wait for.
static int PidReuse(const char* host, int port, const char* tidfile) {
  g_reuse_host = host;
  g_reuse_port = port;
  if (FirstThread(tidfile) != 0) return 1;
  struct timespec start, round, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  round = now = start;
  do {
    if (now.tv_sec - round.tv_sec >= 10) {
      fprintf(stderr, "tid %d was not handed out again within 10 s; starting over\n", (int)g_reuse_tid);
      g_reuse_quiet = 1;
      if (FirstThread(tidfile) != 0) return 1;
      round = now;
    }
    pthread_t t;
    void* got = NULL;
    if (pthread_create(&t, NULL, ConnectIfTid, NULL) == 0) {
      pthread_join(t, &got);
      if (got != NULL) return 0;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
  } while (now.tv_sec - start.tv_sec < 60);
  printf("no tid handed out again within 60 s (last tried: %d)\n", (int)g_reuse_tid);
  return 0;
}

static int Udp(const char* how, const char* host, int port) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in a = Addr(host, port);
  char msg[] = "ping";
  ssize_t n;
  if (strcmp(how, "udp-sendto") == 0) {
    n = sendto(s, msg, 4, 0, (struct sockaddr*)&a, sizeof a);
  } else if (strcmp(how, "udp-connect") == 0) {
    if (connect(s, (struct sockaddr*)&a, sizeof a) != 0) {
      printf("connect: %s\n", Name(errno));
      return 0;
    }
    n = send(s, msg, 4, 0);
  } else {
    struct iovec iov = {msg, 4};
    struct msghdr h;
    memset(&h, 0, sizeof h);
    h.msg_name = &a;
    h.msg_namelen = sizeof a;
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    if (strcmp(how, "udp-sendmsg") == 0) {
      n = sendmsg(s, &h, 0);
    } else {
      struct mmsghdr m[2];
      memset(m, 0, sizeof m);
      m[0].msg_hdr = h;
      m[1].msg_hdr = h;
      int sent = sendmmsg(s, m, 2, 0);
      if (sent < 0) {
        printf("send: %s\n", Name(errno));
        return 0;
      }
      printf("sent %d messages, lengths %u %u\n", sent, m[0].msg_len, m[1].msg_len);
      ReadReply(s);
      return 0;
    }
  }
  if (n < 0) {
    printf("send: %s\n", Name(errno));
    return 0;
  }
  printf("sent %zd\n", n);
  ReadReply(s);
  return 0;
}

static int FastOpen(const char* host, int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = Addr(host, port);
  ssize_t n = sendto(s, "hi\n", 3, MSG_FASTOPEN, (struct sockaddr*)&a, sizeof a);
  if (n < 0) {
    printf("sendto: %s\n", Name(errno));
    return 0;
  }
  printf("sendto: %zd\n", n);
  ReadReply(s);
  return 0;
}

static long Int80(long nr, long a, long b, long c) {
  long r;
  __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
  return r;
}

static long Int80x5(long nr, long a, long b, long c, long d, long e) {
  long r;
  __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e) : "memory");
  return r;
}

// A kernel without the 32-bit ABI (IA32 emulation off, or a VM that does not pass the
// gate on) answers `int $0x80` with a general protection fault: SIGSEGV, reported as
// "no-abi" instead of killing the probe.
static sigjmp_buf g_int80_fault;
static void Int80Faulted(int sig) {
  (void)sig;
  siglongjmp(g_int80_fault, 1);
}

static void CatchInt80Faults(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = Int80Faulted;
  sigaction(SIGSEGV, &sa, NULL);
}

static int Int80Probe(void) {
  CatchInt80Faults();
  if (sigsetjmp(g_int80_fault, 1) != 0) {
    printf("socket: no-abi\nsocketcall: no-abi\nsetsockopt: no-abi\n");
    return 0;
  }
  long r = Int80(359, AF_INET, SOCK_STREAM, 0);  // i386 socket
  printf("socket: %s\n", r >= 0 ? "ok" : Name((int)-r));
  uint32_t* args = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
  args[0] = AF_INET;
  args[1] = SOCK_STREAM;
  args[2] = 0;
  r = Int80(102, 1 /* SYS_SOCKET */, (long)(uintptr_t)args, 0);  // i386 socketcall
  printf("socketcall: %s\n", r >= 0 ? "ok" : Name((int)-r));
  // A segment routing header on a UDP socket made through the 64-bit ABI, set
  // through the 32-bit one (the native filter refuses it).
  int s = socket(AF_INET6, SOCK_DGRAM, 0);
  uint8_t* srh = (uint8_t*)(args + 16);
  memset(srh, 0, 40);
  srh[1] = 4;  // hdr ext len: two segments
  srh[2] = 4;  // type 4: segment routing
  srh[3] = 1;  // segments left
  srh[4] = 1;  // last entry
  srh[8 + 15] = 0x99;  // fd00::99 (the final one), then ::1
  srh[8] = 0xfd;
  srh[24 + 15] = 1;
  r = Int80x5(366 /* i386 setsockopt */, s, IPPROTO_IPV6, 57 /* IPV6_RTHDR */, (long)(uintptr_t)srh, 40);
  printf("setsockopt: %s\n", r >= 0 ? "ok" : Name((int)-r));
  close(s);
  return 0;
}

static int Tiocsti(void) {
  char c = '#';
  printf("native: %s\n", ioctl(0, TIOCSTI, &c) == 0 ? "ok" : Name(errno));
  long r = syscall(SYS_ioctl, 0, 0xffffffff00000000ul | TIOCSTI, &c);
  printf("high bits: %s\n", r == 0 ? "ok" : Name(errno));
  CatchInt80Faults();
  if (sigsetjmp(g_int80_fault, 1) != 0) {
    printf("int80: no-abi\n");
    return 0;
  }
  char* low = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
  low[0] = '#';
  r = Int80(54 /* i386 ioctl */, 0, TIOCSTI, (long)(uintptr_t)low);
  printf("int80: %s\n", r == 0 ? "ok" : Name((int)-r));
  return 0;
}

static int IoUring(void) {
  char params[120];
  memset(params, 0, sizeof params);
  long r = syscall(425 /* io_uring_setup */, 4, params);
  printf("io_uring_setup: %s\n", r >= 0 ? "ok" : Name(errno));
  return 0;
}

static struct sockaddr_in g_shared;
static atomic_int g_stop;
static atomic_uint g_flips;  // how many times the port was rewritten
static int g_ports[2];

static void* Flip(void* unused) {
  (void)unused;
  for (unsigned i = 0; !atomic_load(&g_stop); ++i) {
    __atomic_store_n(&g_shared.sin_port, htons((uint16_t)g_ports[i & 1]), __ATOMIC_RELAXED);
    atomic_fetch_add_explicit(&g_flips, 1, memory_order_relaxed);
  }
  return NULL;
}

static int Race(const char* host, int allowed, int denied, int n) {
  g_shared = Addr(host, allowed);
  g_ports[0] = allowed;
  g_ports[1] = denied;
  pthread_t t;
  pthread_create(&t, NULL, Flip, NULL);
  int reached = 0, ok = 0, refused = 0;
  for (int i = 0; i < n; ++i) {
    // The rewriter must have run since the last connect: descheduled, it would leave
    // one port in place for every connect (seen: 400 of 400 on the denied one).
    const unsigned seen = atomic_load(&g_flips);
    while (atomic_load(&g_flips) == seen) sched_yield();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr*)&g_shared, sizeof g_shared) == 0) {
      struct sockaddr_in peer;
      socklen_t len = sizeof peer;
      getpeername(s, (struct sockaddr*)&peer, &len);
      if (ntohs(peer.sin_port) == denied) ++reached; else ++ok;
    } else {
      ++refused;
    }
    close(s);
  }
  atomic_store(&g_stop, 1);
  pthread_join(t, NULL);
  printf("reached-denied %d, allowed %d, refused %d\n", reached, ok, refused);
  return 0;
}

static int Unix(const char* path, int type) {
  int s = socket(AF_UNIX, type, 0);
  struct sockaddr_un a;
  memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  strncpy(a.sun_path, path, sizeof a.sun_path - 1);
  if (type == SOCK_DGRAM) {
    if (sendto(s, "ping", 4, 0, (struct sockaddr*)&a, sizeof a) < 0) {
      printf("sendto: %s\n", Name(errno));
      return 0;
    }
    printf("sendto: ok\n");
    return 0;
  }
  if (connect(s, (struct sockaddr*)&a, sizeof a) != 0) {
    printf("connect: %s\n", Name(errno));
    return 0;
  }
  printf("connect: ok\n");
  ReadReply(s);
  return 0;
}

static int Inherited(const char* host, int port) {
  if (write(3, "x", 1) < 0) printf("fd 3: %s\n", Name(errno)); else printf("fd 3: written\n");
  struct sockaddr_in a = Addr(host, port);
  if (sendto(0, "ping", 4, 0, (struct sockaddr*)&a, sizeof a) < 0) {
    printf("stdin sendto: %s\n", Name(errno));
  } else {
    printf("stdin sendto: ok\n");
  }
  return 0;
}

static int PassFd(const char* host, int allowed, int denied) {
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct sockaddr_in ok = Addr(host, allowed), no = Addr(host, denied);
  printf("allowed: %s\n", sendto(s, "ping", 4, 0, (struct sockaddr*)&ok, sizeof ok) == 4 ? "sent" : Name(errno));
  int sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  pid_t child = fork();
  if (child == 0) {
    char byte;
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {&byte, 1};
    struct msghdr h;
    memset(&h, 0, sizeof h);
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = control;
    h.msg_controllen = sizeof control;
    if (recvmsg(sv[1], &h, 0) <= 0) _exit(1);
    int got;
    memcpy(&got, CMSG_DATA(CMSG_FIRSTHDR(&h)), sizeof got);
    printf("passed, denied: %s\n", sendto(got, "ping", 4, 0, (struct sockaddr*)&no, sizeof no) == 4 ? "sent" : Name(errno));
    fflush(stdout);
    _exit(0);
  }
  char byte = 'x';
  char control[CMSG_SPACE(sizeof(int))];
  memset(control, 0, sizeof control);
  struct iovec iov = {&byte, 1};
  struct msghdr h;
  memset(&h, 0, sizeof h);
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  h.msg_control = control;
  h.msg_controllen = sizeof control;
  struct cmsghdr* c = CMSG_FIRSTHDR(&h);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &s, sizeof s);
  if (sendmsg(sv[0], &h, 0) < 0) printf("passing: %s\n", Name(errno));
  fflush(stdout);
  waitpid(child, NULL, 0);
  printf("same process, denied: %s\n", sendto(s, "ping", 4, 0, (struct sockaddr*)&no, sizeof no) == 4 ? "sent" : Name(errno));
  return 0;
}

static int Malformed(const char* host, int port) {
  struct sockaddr_in a = Addr(host, port);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  printf("short: %s\n", connect(s, (struct sockaddr*)&a, 3) == 0 ? "ok" : Name(errno));
  char big[200];
  memset(big, 0, sizeof big);
  memcpy(big, &a, sizeof a);
  printf("long: %s\n", connect(s, (struct sockaddr*)big, sizeof big) == 0 ? "ok" : Name(errno));
  printf("bad pointer: %s\n", syscall(SYS_connect, s, (void*)16, sizeof a) == 0 ? "ok" : Name(errno));
  struct sockaddr_in odd = a;
  odd.sin_family = 12345;
  printf("bad family: %s\n", connect(s, (struct sockaddr*)&odd, sizeof odd) == 0 ? "ok" : Name(errno));
  int u = socket(AF_INET, SOCK_DGRAM, 0);
  struct msghdr h;
  memset(&h, 0, sizeof h);
  h.msg_name = &a;
  h.msg_namelen = sizeof a;
  h.msg_iov = (struct iovec*)16;
  h.msg_iovlen = 1;
  printf("bad iov: %s\n", sendmsg(u, &h, 0) >= 0 ? "ok" : Name(errno));
  printf("bad msghdr: %s\n", syscall(SYS_sendmsg, u, (void*)16, 0) >= 0 ? "ok" : Name(errno));
  printf("not a socket: %s\n", connect(1, (struct sockaddr*)&a, sizeof a) == 0 ? "ok" : Name(errno));
  printf("bad descriptor: %s\n", connect(999, (struct sockaddr*)&a, sizeof a) == 0 ? "ok" : Name(errno));
  printf("vsock: %s\n", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0) >= 0 ? "ok" : Name(errno));
  printf("good: %s\n", connect(s, (struct sockaddr*)&a, sizeof a) == 0 ? "ok" : Name(errno));
  ReadReply(s);
  return 0;
}

static int ServeOnce(int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int on = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  struct sockaddr_in a = Addr("127.0.0.1", port);
  if (bind(s, (struct sockaddr*)&a, sizeof a) != 0 || listen(s, 4) != 0) {
    printf("listen: %s\n", Name(errno));
    return 1;
  }
  printf("listening\n");
  fflush(stdout);
  int c = accept(s, NULL, NULL);
  dprintf(c, "hello from the group\n");
  close(c);
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) return 2;
  const char* cmd = argv[1];
  if (strcmp(cmd, "tcp-raw") == 0 && argc == 4) return TcpRaw(argv[2], atoi(argv[3]));
  if (strcmp(cmd, "tcp-timeout") == 0 && argc == 5) return TcpTimeout(argv[2], atoi(argv[3]), atoi(argv[4]));
  if (strncmp(cmd, "udp-", 4) == 0 && argc == 4) return Udp(cmd, argv[2], atoi(argv[3]));
  if (strcmp(cmd, "fastopen") == 0 && argc == 4) return FastOpen(argv[2], atoi(argv[3]));
  if (strcmp(cmd, "int80") == 0) return Int80Probe();
  if (strcmp(cmd, "iouring") == 0) return IoUring();
  if (strcmp(cmd, "tiocsti") == 0) return Tiocsti();
  if (strcmp(cmd, "race") == 0 && argc == 6) return Race(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
  if (strcmp(cmd, "unix") == 0 && argc == 3) return Unix(argv[2], SOCK_STREAM);
  if (strcmp(cmd, "unix-dgram") == 0 && argc == 3) return Unix(argv[2], SOCK_DGRAM);
  if (strcmp(cmd, "inherited") == 0 && argc == 4) return Inherited(argv[2], atoi(argv[3]));
  if (strcmp(cmd, "passfd") == 0 && argc == 5) return PassFd(argv[2], atoi(argv[3]), atoi(argv[4]));
  if (strcmp(cmd, "malformed") == 0 && argc == 4) return Malformed(argv[2], atoi(argv[3]));
  if (strcmp(cmd, "serve-once") == 0 && argc == 3) return ServeOnce(atoi(argv[2]));
  if (strcmp(cmd, "pid-reuse") == 0 && argc == 5) return PidReuse(argv[2], atoi(argv[3]), argv[4]);
  fprintf(stderr, "probe: unknown command or arguments\n");
  return 2;
}
