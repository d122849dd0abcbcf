/* glibc's DNS message parser (libresolv: ns_initparse, ns_parserr,
 * ns_name_uncompress), and the accessors that are macros in
 * <arpa/nameser.h> and so invisible to Swift. */
#ifndef PALISADE_CRESOLV_H
#define PALISADE_CRESOLV_H

#include <stdint.h>
#include <arpa/nameser.h>
#include <resolv.h>

static inline uint16_t pal_ns_msg_id(const ns_msg *m) { return ns_msg_id(*m); }
static inline uint16_t pal_ns_msg_count(const ns_msg *m, ns_sect s) { return ns_msg_count(*m, s); }
static inline const unsigned char *pal_ns_msg_base(const ns_msg *m) { return ns_msg_base(*m); }
static inline const unsigned char *pal_ns_msg_end(const ns_msg *m) { return ns_msg_end(*m); }

/* The length of the header and question section (a REFUSED answer repeats
 * them), or -1 if the message is malformed. */
int pal_ns_question_end(const unsigned char *msg, int len);

#endif
