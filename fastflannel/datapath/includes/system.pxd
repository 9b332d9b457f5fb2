# SPDX-License-Identifier: Apache-2.0
"""Declare the C APIs the fast path uses that Cython's bundled libc/posix pxds lack; only the fields we touch."""
from libc.stdint cimport uint16_t, uint32_t
from posix.time cimport timespec
from posix.uio cimport iovec


cdef extern from "<poll.h>" nogil:
    ctypedef unsigned long nfds_t

    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd *fds, nfds_t nfds, int timeout)

    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:  # recvmmsg/sendmmsg need _GNU_SOURCE: Python.h (pyconfig.h) defines it, and comes first
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr *CMSG_FIRSTHDR(msghdr *msgh)
    cmsghdr *CMSG_NXTHDR(msghdr *msgh, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    ssize_t sendto(int sockfd, const void *buf, size_t len, int flags, const void *dest_addr, socklen_t addrlen)
    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)

    enum:
        AF_INET
        MSG_DONTWAIT
        MSG_TRUNC


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
        # ... sin_zero


cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)

    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC



cdef extern from "<sched.h>" nogil:
    int sched_yield()
    struct sched_param:
        int sched_priority
    enum:
        SCHED_OTHER
        SCHED_FIFO
        SCHED_RR
    int sched_getscheduler(int pid)
    int sched_getparam(int pid, sched_param *param)
    int sched_setscheduler(int pid, int policy, const sched_param *param)
