/*
 * nodelay.so: an LD_PRELOAD shim that sets TCP_NODELAY on every TCP socket a process
 * connects or accepts.  The benchmark compiles it at run time (gcc -shared -fPIC, into
 * the scratch directory) and preloads it into both QEMU processes of the
 * qemu-*-nodelay rows: QEMU 7.2's NBD client and server never set TCP_NODELAY, so with
 * requests in flight Nagle's algorithm and delayed ACKs hold them back.  The issue asks
 * for QEMU both as shipped and with this forced: the fair comparison.
 *
 * Design note: connect() and accept()/accept4() are wrapped, not socket(): the option
 * is set only on sockets that are TCP (SO_TYPE stream, family inet/inet6), so unix
 * sockets (QMP) are left alone.  Setting TCP_NODELAY before a non-blocking connect
 * (as QEMU does it) is fine: the option is kept for the connection.  With
 * REPLFS_NODELAY_LOG set, one line per socket goes to stderr (the benchmark checks
 * QEMU's log for it, so a shim that did not load is noticed, not silently measured).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

static void set_nodelay(int fd, const char *how)
{
    int type = 0, one = 1;
    socklen_t len = sizeof(type);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
        type != SOCK_STREAM || getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6))
        return;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) == 0 &&
        getenv("REPLFS_NODELAY_LOG"))
        fprintf(stderr, "nodelay: TCP_NODELAY set on fd %d (%s)\n", fd, how);
}

int connect(int fd, const struct sockaddr *addr, socklen_t alen)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);

    if (!real)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    set_nodelay(fd, "connect");
    return real(fd, addr, alen);
}

int accept(int fd, struct sockaddr *addr, socklen_t *alen)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);
    int c;

    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    c = real(fd, addr, alen);
    set_nodelay(c, "accept");
    return c;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    int c;

    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    c = real(fd, addr, alen, flags);
    set_nodelay(c, "accept4");
    return c;
}
