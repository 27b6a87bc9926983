/* Envelope: syscall numbers and the syscall entry frame, shared by the programs that read
 * syscall arguments from a raw sys_enter (bpf/sensor.c and the programs it tail-calls).
 *
 * The numbers come in as -D flags from sensor/syscalls.py (kernel_cflags); the defaults are
 * x86_64's. The register offsets are those of the x86_64 entry frame (struct pt_regs), the same
 * layout as the uapi struct user_regs_struct: stable ABI, unlike kernel structs in general.
 */
#ifndef ENVELOPE_SYSCALLS_H
#define ENVELOPE_SYSCALLS_H

#ifndef NR_WRITE
#define NR_WRITE 1
#endif
#ifndef NR_CLOSE
#define NR_CLOSE 3
#endif
#ifndef NR_WRITEV
#define NR_WRITEV 20
#endif
#ifndef NR_CONNECT
#define NR_CONNECT 42
#endif
#ifndef NR_SENDTO
#define NR_SENDTO 44
#endif
#ifndef NR_SENDMSG
#define NR_SENDMSG 46
#endif

#define REGS_OFF_DX 96
#define REGS_OFF_SI 104
#define REGS_OFF_DI 112
#define REGS_OFF_SP 152

#endif /* ENVELOPE_SYSCALLS_H */
