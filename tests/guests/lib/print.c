#include "print.h"

#include "serial.h"
#include "string.h"

/* Where characters go: the UART, or a buffer while format() runs. */
static struct {
	char *buf;
	size_t len, room; /* room 0: the UART */
} out;

static void emit(char c)
{
	if (!out.room) {
		serial_putc(c);
		return;
	}
	if (out.len + 1 < out.room)
		out.buf[out.len] = c;
	out.len++;
}

struct spec {
	bool alt;  /* '#': prefix hex with 0x */
	bool zero; /* '0': pad with zeros */
	bool wide; /* 'l': 64-bit argument */
	unsigned width;
};

/* Digits of v in `base`, least significant first; returns how many. */
static unsigned to_digits(u64 v, unsigned base, char *out)
{
	unsigned n = 0;
	do {
		out[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	return n;
}

static void put_number(u64 v, bool negative, unsigned base, const struct spec *sp)
{
	char digits[24];
	unsigned n = to_digits(v, base, digits);
	unsigned prefix = (sp->alt && base == 16 ? 2 : 0) + (negative ? 1 : 0);
	unsigned len = n + prefix;

	if (!sp->zero)
		for (; len < sp->width; len++)
			emit(' ');
	if (negative)
		emit('-');
	if (sp->alt && base == 16) {
		emit('0');
		emit('x');
	}
	if (sp->zero)
		for (; len < sp->width; len++)
			emit('0');
	while (n)
		emit(digits[--n]);
}

/* Parses flags, width and length after a '%'; returns the conversion character's position. */
static const char *parse_spec(const char *p, struct spec *sp)
{
	*sp = (struct spec){ 0 };
	for (;; p++) {
		if (*p == '#')
			sp->alt = true;
		else if (*p == '0')
			sp->zero = true;
		else
			break;
	}
	for (; *p >= '0' && *p <= '9'; p++)
		sp->width = sp->width * 10 + (unsigned)(*p - '0');
	if (*p == 'l') {
		sp->wide = true;
		p++;
	}
	return p;
}

static void put_signed(const struct spec *sp, va_list *ap)
{
	int64_t v = sp->wide ? va_arg(*ap, int64_t) : va_arg(*ap, int);
	u64 magnitude = v < 0 ? -(u64)v : (u64)v;
	put_number(magnitude, v < 0, 10, sp);
}

static void put_unsigned(const struct spec *sp, unsigned base, va_list *ap)
{
	u64 v = sp->wide ? va_arg(*ap, u64) : va_arg(*ap, unsigned);
	put_number(v, false, base, sp);
}

void vprint(const char *fmt, va_list ap)
{
	va_list args;
	struct spec sp;

	va_copy(args, ap);
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			emit(*p);
			continue;
		}
		p = parse_spec(p + 1, &sp);
		switch (*p) {
		case 's': {
			const char *s = va_arg(args, const char *);
			while (*s)
				emit(*s++);
			break;
		}
		case 'c': emit((char)va_arg(args, int)); break;
		case 'd': put_signed(&sp, &args); break;
		case 'u': put_unsigned(&sp, 10, &args); break;
		case 'x': put_unsigned(&sp, 16, &args); break;
		case '%': emit('%'); break;
		default: return; /* unknown conversion or end of string: stop */
		}
	}
	va_end(args);
}

void print(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
}

size_t format(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	out.buf = buf;
	out.len = 0;
	out.room = size;
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	if (size)
		buf[out.len < size ? out.len : size - 1] = 0;
	size_t n = out.len;
	out.room = 0;
	return n;
}
