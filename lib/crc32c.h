/* crc32c.h: CRC-32C (Castagnoli), SSE4.2 when the CPU has it. */
#ifndef VR_CRC32C_H
#define VR_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Extend crc (0 to start) over len bytes; returns the new CRC. */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

#endif
