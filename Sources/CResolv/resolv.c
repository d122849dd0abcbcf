#include "CResolv.h"

int pal_ns_question_end(const unsigned char *msg, int len)
{
	if (len < NS_HFIXEDSZ)
		return -1;
	int qd = (msg[4] << 8) | msg[5];
	const unsigned char *p = msg + NS_HFIXEDSZ, *end = msg + len;
	for (int i = 0; i < qd; i++) {
		if (ns_name_skip(&p, end) < 0 || end - p < NS_QFIXEDSZ)
			return -1;
		p += NS_QFIXEDSZ;
	}
	return (int)(p - msg);
}
